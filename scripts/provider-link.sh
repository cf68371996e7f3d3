#!/usr/bin/env bash
# Places target/<profile>/prov/libvfabric-fi.so, the file name libfabric's FI_PROVIDER_PATH
# scan wants, as a link to cargo's target/<profile>/libvfabric_provider.so.
#   scripts/provider-link.sh [debug|release]      (default: debug)
#   FI_PROVIDER_PATH=$PWD/target/debug/prov fi_info -p vfabric
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-debug}"
dir="target/$profile"
[ -f "$dir/libvfabric_provider.so" ] || { echo "provider-link: $dir/libvfabric_provider.so not built (cargo build -p vfabric-provider)" >&2; exit 1; }
mkdir -p "$dir/prov"
ln -sfn ../libvfabric_provider.so "$dir/prov/libvfabric-fi.so"
# The provider's extension header, beside the provider (fi_open_ops names and structs).
cp crates/provider/include/fi_vfabric.h "$dir/prov/fi_vfabric.h"
