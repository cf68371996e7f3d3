#!/usr/bin/env bash
# The main job: an embedded vfabricd and two guests exchanging data, with a results table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p vfabric-cli
exec target/release/vfabric demo "$@"
