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
