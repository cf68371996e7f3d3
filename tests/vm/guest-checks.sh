#!/bin/sh
# Guest-side checks of the driver's pci transport, for scripts/vm-test.sh --guest-script (run in
# every guest; sources the runner's /etc/vfabric/lib.sh). One "VFABRIC-VM: PASS|FAIL|SKIP name"
# line per check.
#
# Needs from the runner's initramfs: vfabric (the CLI) and vf_exchange_test (the driver's
# example crates/driver/examples/vf_exchange_test.rs, staged as a vf_*_test binary), the
# uio_pci_generic module, and for two guests the mailbox (vm_put/vm_get).
#
# Per guest: huge pages for DMA memory, the device bound to uio_pci_generic, `vfabric info`
# listing it under its PCI address. Between two guests: messages, tagged messages and RMA read
# and write with every byte verified (vf_exchange_test), and `vfabric pingpong --verify`.
. /etc/vfabric/lib.sh

# DMA memory: 2 MiB huge pages make every ring, slot area and buffer physically contiguous
# (without them the driver falls back to 4 KiB pages, whose physical runs may be too short).
echo 64 >/proc/sys/vm/nr_hugepages
hp=$(cat /proc/sys/vm/nr_hugepages)
if [ "$hp" -ge 16 ]; then
    vm_pass "hugepages ($hp × 2 MiB reserved)"
else
    vm_fail "hugepages (only $hp reserved)"
fi
# A small region per domain: two domains per guest in the checks below.
export VFABRIC_MEM_MB=16
export VFABRIC_DEVICE_ID

dev=$(fabric_pci_dev) || {
    vm_fail "pci-device (no 1af4:$VFABRIC_PCI_DEVICE on the bus)"
    exit 0
}
bdf=${dev##*/}
echo "1af4 $VFABRIC_PCI_DEVICE" >/sys/bus/pci/drivers/uio_pci_generic/new_id 2>/dev/null
drv=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)
if [ "$drv" = uio_pci_generic ] && [ -n "$(ls "$dev/uio" 2>/dev/null)" ]; then
    vm_pass "pci-uio-bind ($bdf -> uio_pci_generic: interrupts through /dev/$(ls "$dev/uio"))"
else
    vm_fail "pci-uio-bind (driver '${drv:-none}')"
fi

info=$(timeout 60 vfabric info 2>&1)
rc=$?
if [ "$rc" = 0 ] && echo "$info" | grep -q "device: pci:$bdf" &&
    echo "$info" | grep -q "fabric id: $(printf '%x' "$VFABRIC_FABRIC_ID")"; then
    vm_pass "pci-vfabric-info (pci:$bdf, fabric id $(printf '%x' "$VFABRIC_FABRIC_ID"), through QUERY_CAPS)"
else
    vm_fail "pci-vfabric-info (status $rc: $(echo "$info" | tail -3 | tr '\n' ' ' | cut -c1-200))"
fi

[ "$VFABRIC_VMS" = 2 ] || exit 0
other=$((1 - VFABRIC_VM))
device="pci:$bdf"

# Messages, tagged messages, RMA read and write between the guests, every byte verified. The
# server's address line travels through the mailbox (spaces as commas).
if ! command -v vf_exchange_test >/dev/null; then
    vm_skip pci-exchange-vm-vm "vf_exchange_test not in the initramfs (cargo build --examples)"
elif [ "$VFABRIC_VM" = 0 ]; then
    rm -f /tmp/x.addr
    timeout 150 vf_exchange_test server "$device" /tmp/x.addr >/tmp/x.out 2>&1 &
    x=$!
    i=0
    while [ ! -s /tmp/x.addr ] && [ "$i" -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
    vm_put x-addr "$(tr ' ' , </tmp/x.addr 2>/dev/null)"
    if wait "$x"; then
        vm_pass "pci-exchange-vm-vm (server: $(tail -1 /tmp/x.out))"
    else
        vm_fail "pci-exchange-vm-vm (server: $(tail -2 /tmp/x.out | tr '\n' ' ' | cut -c1-200))"
    fi
else
    if addr=$(vm_get x-addr 120) && [ -n "$addr" ]; then
        echo "$addr" | tr , ' ' >/tmp/x.addr
        if timeout 150 vf_exchange_test client "$device" /tmp/x.addr >/tmp/x.out 2>&1; then
            vm_pass "pci-exchange-vm-vm (client: $(tail -1 /tmp/x.out))"
        else
            vm_fail "pci-exchange-vm-vm (client: $(tail -2 /tmp/x.out | tr '\n' ' ' | cut -c1-200))"
        fi
    else
        vm_fail "pci-exchange-vm-vm (no server address from vm$other)"
    fi
fi

# vfabric pingpong with every byte verified; its numbers are TCG emulation, not performance.
sizes=8,4k,64k,1m
if [ "$VFABRIC_VM" = 0 ]; then
    rm -f /tmp/pp.addr
    timeout 150 vfabric pingpong --device "$device" --server --addr-file /tmp/pp.addr \
        --sizes $sizes --iters 200 --warmup 10 --verify --quiet >/tmp/pp.out 2>&1 &
    pp=$!
    i=0
    while [ ! -s /tmp/pp.addr ] && [ "$i" -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
    vm_put pp-addr "$(cat /tmp/pp.addr 2>/dev/null)"
    if wait "$pp"; then
        vm_pass "pci-pingpong-vm-vm (server, --verify)"
    else
        vm_fail "pci-pingpong-vm-vm (server: $(tail -2 /tmp/pp.out | tr '\n' ' ' | cut -c1-200))"
    fi
else
    if addr=$(vm_get pp-addr 120) && [ -n "$addr" ]; then
        echo "$addr" >/tmp/pp.addr
        if timeout 150 vfabric pingpong --device "$device" --addr-file /tmp/pp.addr \
            --sizes $sizes --iters 200 --warmup 10 --verify --quiet >/tmp/pp.out 2>&1; then
            vm_pass "pci-pingpong-vm-vm (client, --verify, sizes $sizes)"
            # The table, for docs/perf.md (TCG emulation).
            sed 's/^/VFABRIC-VM: INFO pp | /' /tmp/pp.out
        else
            vm_fail "pci-pingpong-vm-vm (client: $(tail -2 /tmp/pp.out | tr '\n' ' ' | cut -c1-200))"
        fi
    else
        vm_fail "pci-pingpong-vm-vm (no server address from vm$other)"
    fi
fi
# The same in blocking mode: every wait sleeps on the device interrupt (uio).
if [ "$VFABRIC_VM" = 0 ]; then
    rm -f /tmp/ppb.addr
    timeout 150 vfabric pingpong --device "$device" --server --addr-file /tmp/ppb.addr \
        --sizes 8,64k --iters 50 --warmup 5 --mode block --verify --quiet >/tmp/ppb.out 2>&1 &
    pp=$!
    i=0
    while [ ! -s /tmp/ppb.addr ] && [ "$i" -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
    vm_put ppb-addr "$(cat /tmp/ppb.addr 2>/dev/null)"
    if wait "$pp"; then
        vm_pass "pci-pingpong-interrupts-vm-vm (server, --mode block, $(grep uio_pci_generic /proc/interrupts | awk '{print $2}') interrupts)"
    else
        vm_fail "pci-pingpong-interrupts-vm-vm (server: $(tail -2 /tmp/ppb.out | tr '\n' ' ' | cut -c1-200))"
    fi
else
    if addr=$(vm_get ppb-addr 120) && [ -n "$addr" ]; then
        echo "$addr" >/tmp/ppb.addr
        if timeout 150 vfabric pingpong --device "$device" --addr-file /tmp/ppb.addr \
            --sizes 8,64k --iters 50 --warmup 5 --mode block --verify --quiet >/tmp/ppb.out 2>&1; then
            vm_pass "pci-pingpong-interrupts-vm-vm (client, --mode block, $(grep uio_pci_generic /proc/interrupts | awk '{print $2}') interrupts)"
        else
            vm_fail "pci-pingpong-interrupts-vm-vm (client: $(tail -2 /tmp/ppb.out | tr '\n' ' ' | cut -c1-200))"
        fi
    else
        vm_fail "pci-pingpong-interrupts-vm-vm (no server address from vm$other)"
    fi
fi
exit 0
