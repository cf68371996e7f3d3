#!/usr/bin/env bash
# Installs what virtio-fabric needs on a fresh Debian machine, only when missing.
# Debian packages: libfabric (headers, library and the fi_* tools used as baselines and by the
# provider tests), libclang (bindgen), valgrind (callgrind cost figures), iproute2 (netns tests),
# libpmem2 (vfabricd persists persistent-memory regions with it), strace (a pmem test traces msync),
# python3 (scripts/spec_latex.py checks the spec's LaTeX chapter; standard library only),
# debian-archive-keyring and xz-utils (scripts/vm-test.sh checks the packages it fetches against
# the archive keys and unpacks the guest kernel with xz; both are on most Debian systems),
# Open MPI (openmpi-bin, libopenmpi-dev: the MPI job over the provider in tests/provider.rs).
set -euo pipefail

need=()
for pkg in libfabric-dev libfabric-bin libclang-dev valgrind iproute2 pkg-config libpmem2-dev strace python3 \
    debian-archive-keyring xz-utils openmpi-bin libopenmpi-dev; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        need+=("$pkg")
    fi
done
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq || true
    $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
