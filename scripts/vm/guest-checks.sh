#!/bin/sh
# Default guest-side checks of scripts/vm-test.sh, run in every guest. One
# "VFABRIC-VM: PASS|FAIL|SKIP name" line per check; the host script counts them.
. /etc/vfabric/lib.sh

# ---- The device on the PCI bus, without any driver of ours ----------------------------------
dev=$(fabric_pci_dev)
if [ -z "$dev" ]; then
    vm_fail "pci-device (no 1af4:$VFABRIC_PCI_DEVICE on the bus: $(cat /sys/bus/pci/devices/*/device | tr '\n' ' '))"
    exit 0
fi
bdf=${dev##*/}
vm_pass "pci-device ($bdf is 1af4:$VFABRIC_PCI_DEVICE, virtio id $VFABRIC_DEVICE_ID)"

caps=""
for t in 1 2 3 4; do
    c=$(virtio_cap "$dev" $t) && caps="$caps $t:bar${c% * *}"
done
if [ "$(echo $caps | wc -w)" = 4 ]; then
    vm_pass "virtio-caps (common, notify, ISR, device config:$caps)"
else
    vm_fail "virtio-caps (found only:$caps)"
fi

# ---- Bound to uio_pci_generic: what a userspace driver uses --------------------------------------
echo "1af4 $VFABRIC_PCI_DEVICE" >/sys/bus/pci/drivers/uio_pci_generic/new_id 2>/dev/null
drv=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)
uio=$(ls "$dev/uio" 2>/dev/null | head -1)
if [ "$drv" = uio_pci_generic ] && [ -n "$uio" ] && [ -c "/dev/$uio" ]; then
    vm_pass "uio-bind ($bdf -> uio_pci_generic, /dev/$uio)"
else
    vm_fail "uio-bind (driver '${drv:-none}', uio '${uio:-none}')"
fi

# ---- Device configuration through the BAR window (struct virtio_fabric_config) -----------------
# The daemon answers each read (vhost-user GET_CONFIG); compare with what it was started with.
qp=$(devcfg_u32 "$dev" 0)
vendor=$(devcfg_u32 "$dev" 28)
node=$(devcfg_u64 "$dev" 32)
fabric=$(devcfg_u32 "$dev" 44)
# Device VFABRIC_VM of the daemon (host id 1): node address = fabric << 32 | 1 << 16 | device.
want_node=$(((VFABRIC_FABRIC_ID << 32) | (1 << 16) | VFABRIC_VM))
if [ "$qp" = "$VFABRIC_NUM_QUEUE_PAIRS" ] && [ "$vendor" = $((0x5646)) ] &&
    [ "$fabric" = "$VFABRIC_FABRIC_ID" ] && [ "$node" = "$want_node" ]; then
    vm_pass "device-config (fabric_id $(printf '%#x' "$fabric"), node $(printf '%#x' "$node"), $qp queue pairs, vendor $(printf '%#x' "$vendor"))"
else
    vm_fail "device-config (read: queue pairs '$qp', vendor '$vendor', node '$node', fabric '$fabric'; want $VFABRIC_NUM_QUEUE_PAIRS, $((0x5646)), $want_node, $VFABRIC_FABRIC_ID)"
fi

# ---- Two guests: the mailbox and the private link the cross-VM checks use --------------------
if [ "$VFABRIC_VMS" = 2 ]; then
    vm_put "node$VFABRIC_VM" "$node"
    other=$((1 - VFABRIC_VM))
    if peer_node=$(vm_get "node$other" 180); then
        if [ "$peer_node" = $(((VFABRIC_FABRIC_ID << 32) | (1 << 16) | other)) ]; then
            vm_pass "peer-device (vm$other reads node $(printf '%#x' "$peer_node") from its own device)"
        else
            vm_fail "peer-device (vm$other read node '$peer_node')"
        fi
    else
        vm_fail "peer-device (nothing from vm$other within 180 s)"
    fi
    if net_up; then
        vm_put "net$VFABRIC_VM" up
        if vm_get "net$other" 180 >/dev/null && ping -c 1 -w 30 "$(peer_ip)" >/dev/null 2>&1; then
            vm_pass "guest-link ($(peer_ip) answers)"
        else
            vm_fail "guest-link (no answer from $(peer_ip))"
        fi
    else
        vm_fail "guest-link (eth0 could not be configured)"
    fi
fi

# ---- The vfabric CLI and the provider over the pci transport --------------------------------------
if out=$(vfabric --version 2>&1); then
    vm_pass "cli-runs ($out)"
else
    vm_fail "cli-runs ($out)"
fi
# The CLI lists a device found on the PCI bus under its PCI address; a CLI without the pci
# transport finds nothing. Those checks then SKIP (never PASS), or FAIL with
# VFABRIC_VM_REQUIRE_PCI=1 (vm-test.sh --require-pci).
info=$(timeout 60 vfabric info 2>&1)
info_rc=$?
pci_device=$(echo "$info" | sed -n "s/^ *device: \(.*$bdf.*\)/\1/p" | head -1)
if [ -n "$pci_device" ]; then
    PCI_OK=1
else
    PCI_OK=0
    why=$(echo "$info" | grep -v '^ *$' | tail -1 | tr -d '\033' | cut -c1-160)
    PCI_WHY="vfabric info (status $info_rc) lists no PCI device: ${why:-no output}"
fi
needs_pci() { # NAME: SKIP or FAIL NAME when the pci transport is missing; status 1 then
    [ "$PCI_OK" = 1 ] && return 0
    if [ "${VFABRIC_VM_REQUIRE_PCI:-0}" = 1 ]; then vm_fail "$1 ($PCI_WHY)"; else vm_skip "$1" "$PCI_WHY"; fi
    return 1
}

if needs_pci vfabric-info; then
    if [ "$info_rc" = 0 ] && echo "$info" | grep -q "fabric id: $(printf '%x' "$VFABRIC_FABRIC_ID")"; then
        vm_pass "vfabric-info ($pci_device, fabric id $(printf '%x' "$VFABRIC_FABRIC_ID"))"
    else
        vm_fail "vfabric-info (status $info_rc: $(echo "$info" | tail -3 | tr '\n' ' '))"
    fi
fi

# A guest and a native process on the host (vhost-user driver) on one vfabricd: guest 0 is the
# client of a host-side `vfabric pingpong --server --verify` (same sizes as the host's).
if [ "$VFABRIC_VM" = 0 ] && needs_pci native-pingpong; then
    vm_native_pingpong_server
    if addr=$(vm_get native-addr 120) && [ -n "$addr" ]; then
        echo "$addr" >/tmp/native.addr
        if timeout 120 vfabric pingpong --device "$pci_device" --addr-file /tmp/native.addr \
            --sizes 8,4k,64k --iters 200 --fixed-iters --verify --quiet >/tmp/native.out 2>&1; then
            vm_pass "native-pingpong (guest client, host server, --verify)"
        else
            vm_fail "native-pingpong ($(tail -2 /tmp/native.out | tr '\n' ' '))"
        fi
    else
        vm_fail "native-pingpong (no address from the host's native server)"
    fi
fi

[ "$VFABRIC_VMS" = 2 ] || exit 0
other=$((1 - VFABRIC_VM))

# vfabric pingpong with every byte verified, guest 0 serving guest 1; the server's address
# travels through the mailbox.
if needs_pci pingpong-vm-vm; then
    if [ "$VFABRIC_VM" = 0 ]; then
        rm -f /tmp/pp.addr
        timeout 120 vfabric pingpong --device "$pci_device" --server --addr-file /tmp/pp.addr \
            --sizes 8,4k,64k,1m --iters 200 --verify --quiet >/tmp/pp.out 2>&1 &
        pp=$!
        i=0
        while [ ! -s /tmp/pp.addr ] && [ "$i" -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
        vm_put pp-addr "$(cat /tmp/pp.addr 2>/dev/null)"
        if wait "$pp"; then vm_pass "pingpong-vm-vm (server, --verify)"; else vm_fail "pingpong-vm-vm (server: $(tail -2 /tmp/pp.out | tr '\n' ' '))"; fi
    else
        if addr=$(vm_get pp-addr 180) && [ -n "$addr" ]; then
            echo "$addr" >/tmp/pp.addr
            if timeout 120 vfabric pingpong --device "$pci_device" --addr-file /tmp/pp.addr \
                --sizes 8,4k,64k,1m --iters 200 --verify --quiet >/tmp/pp.out 2>&1; then
                vm_pass "pingpong-vm-vm (client, --verify: $(grep -c . /tmp/pp.out) lines)"
            else
                vm_fail "pingpong-vm-vm (client: $(tail -2 /tmp/pp.out | tr '\n' ' '))"
            fi
        else
            vm_fail "pingpong-vm-vm (no server address from vm$other)"
        fi
    fi
fi

# fi_pingpong -p vfabric between the guests (its out-of-band exchange runs over eth0).
if [ -z "$VFABRIC_PROVIDER" ] || ! command -v fi_pingpong >/dev/null; then
    vm_skip fi-pingpong-vm-vm "libvfabric-fi.so or fi_pingpong not in the initramfs"
elif needs_pci fi-pingpong-vm-vm; then
    if [ "$VFABRIC_VM" = 0 ]; then
        vm_put fi-pp-server ready
        timeout 120 fi_pingpong -p vfabric -e rdm -c -S 4096 -I 100 >/tmp/fipp.out 2>&1
    else
        vm_get fi-pp-server 180 >/dev/null && sleep 1
        timeout 120 fi_pingpong -p vfabric -e rdm -c -S 4096 -I 100 "$(peer_ip)" >/tmp/fipp.out 2>&1
    fi
    rc=$?
    if [ "$rc" = 0 ]; then vm_pass "fi-pingpong-vm-vm (-e rdm -c, 4 KiB)"; else vm_fail "fi-pingpong-vm-vm (status $rc: $(tail -2 /tmp/fipp.out | tr '\n' ' '))"; fi
fi

# Last: guest 1 is killed (SIGKILL to its QEMU), mid-transfer when the pci transport is there.
# Guest 0's transfer must end in an error, not hang, and the daemon must go on serving it.
if [ "$VFABRIC_VM" = 1 ]; then
    if [ "$PCI_OK" = 1 ] && addr=$(vm_get bw-addr 180) && [ -n "$addr" ]; then
        echo "$addr" >/tmp/bw.addr
        vfabric bw --device "$pci_device" --addr-file /tmp/bw.addr --sizes 64k --iters 1000000 \
            --fixed-iters --quiet >/tmp/bw.out 2>&1 &
        sleep 3
    fi
    vm_kill_me
fi
if needs_pci vm-killed-mid-transfer; then
    rm -f /tmp/bw.addr
    timeout 150 vfabric bw --device "$pci_device" --server --addr-file /tmp/bw.addr --sizes 64k \
        --iters 1000000 --fixed-iters --timeout-s 20 --quiet >/tmp/bw.out 2>&1 &
    bw=$!
    i=0
    while [ ! -s /tmp/bw.addr ] && [ "$i" -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
    vm_put bw-addr "$(cat /tmp/bw.addr 2>/dev/null)"
    vm_get killed1 180 >/dev/null
    wait "$bw"
    rc=$?
    case $rc in
        0) vm_fail "vm-killed-mid-transfer (the transfer to the killed guest succeeded)" ;;
        124 | 137 | 143) vm_fail "vm-killed-mid-transfer (the server hung after its peer died)" ;;
        *) vm_pass "vm-killed-mid-transfer (server failed with status $rc: $(tail -1 /tmp/bw.out | cut -c1-120))" ;;
    esac
fi
if vm_get killed1 180 >/dev/null; then
    fabric=$(devcfg_u32 "$dev" 44)
    if [ "$fabric" = "$VFABRIC_FABRIC_ID" ]; then
        vm_pass "peer-killed (vm1's QEMU was SIGKILLed; this device still answers: fabric_id $(printf '%#x' "$fabric"))"
    else
        vm_fail "peer-killed (device config after vm1 died: fabric_id '$fabric')"
    fi
else
    vm_fail "peer-killed (no word of vm1's death within 180 s)"
fi
exit 0
