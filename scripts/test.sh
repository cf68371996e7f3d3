#!/usr/bin/env bash
# The test command: set-up, formatting, lints, then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
# The spec's LaTeX chapter (docs/virtio-spec) is current and consistent; the generator's own tests.
python3 scripts/spec_latex.py --check
python3 scripts/test_spec_latex.py
cargo clippy --workspace --all-targets -q -- -D warnings
# Binaries used by the cross-process tests (vfabricd and the vfabric CLI), and the examples
# (vf_exchange_test runs in the VM test's guests).
cargo build --workspace --bins --examples -q
# The libfabric provider (cdylib) and its libvfabric-fi.so link, for tests/provider.rs.
cargo build -p vfabric-provider -q
scripts/provider-link.sh debug
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
# Real QEMU guests (TCG) on a host vfabricd: fetches QEMU, a guest kernel and busybox as Debian
# packages into /var/cache/vfabric-vm (VFABRIC_VM_CACHE) on first use and fails loudly without
# them. VFABRIC_VM_TEST=0 leaves it out (said in the output; CI runs it).
if [ "${VFABRIC_VM_TEST:-1}" = 0 ]; then
    echo "test.sh: VFABRIC_VM_TEST=0: the VM test (scripts/vm-test.sh) is NOT run" | tee target/vm-test-output.txt
else
    # --require-pci: the checks of the driver inside the guests FAIL (not SKIP) without it.
    timeout 600 scripts/vm-test.sh --bins target/debug --require-pci 2>&1 | tee target/vm-test-output.txt
fi
# Sum the per-binary results and the VM test's checks into one closing line.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?/) p += $(i-1); if ($i ~ /^failed;?/) f += $(i-1); if ($i ~ /^ignored;?/) s += $(i-1) } }
     /^vm-test: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$/ { p += $2; f += $4; s += $6 }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' target/test-output.txt target/vm-test-output.txt
