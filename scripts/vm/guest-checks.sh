#!/bin/sh
# The guest-side checks of scripts/vm-test.sh, run in every guest. One
# "VFABRIC-VM: PASS|FAIL|SKIP name" line per check; the host script counts them.
#
# Per guest: the device on the PCI bus without any driver of ours (PCI id, virtio-pci
# capabilities, uio_pci_generic binding, device config through the BAR window), then the
# driver's pci transport (`vfabric info` lists the device as pci:BDF). Between two guests, with
# every byte verified: messages, tagged messages, RMA read and write (vf_exchange_test),
# `vfabric pingpong` polled and interrupt-driven, `fi_pingpong -p vfabric`; a guest and a
# native host process (vhost-user driver); a guest killed mid-transfer (the other gets errors,
# the daemon goes on). Checks that need the pci transport SKIP when `vfabric info` finds no PCI
# device, and FAIL instead under vm-test.sh --require-pci (scripts/test.sh).
. /etc/vfabric/lib.sh

# DMA memory: 2 MiB huge pages make every ring, slot area and buffer physically contiguous
# (without them the driver falls back to 4 KiB pages, whose physical runs may be too short).
echo 64 >/proc/sys/vm/nr_hugepages
hp=$(cat /proc/sys/vm/nr_hugepages)
if [ "$hp" -ge 16 ]; then
    vm_pass "hugepages ($hp x 2 MiB reserved)"
else
    vm_fail "hugepages (only $hp reserved)"
fi
# A small shared region per domain (the driver's and the provider's default is 64 MiB): a
# guest opens up to two domains at once below.
export VFABRIC_MEM_MB=16 FI_VFABRIC_MEM_MB=16
export VFABRIC_DEVICE_ID

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

# ---- The vfabric CLI and the driver's pci transport -------------------------------------------
if out=$(vfabric --version 2>&1); then
    vm_pass "cli-runs ($out)"
else
    vm_fail "cli-runs ($out)"
fi
# `vfabric info` prints one "    device: LOCATOR" line per device it reached; a device found on
# the PCI bus is "pci:DDDD:BB:DD.F". A CLI that cannot drive it (no pci transport, no huge
# pages, the device not answering QUERY_CAPS) lists no such line: the checks that need it then
# SKIP (never PASS), or FAIL with VFABRIC_VM_REQUIRE_PCI=1 (vm-test.sh --require-pci).
info=$(timeout 60 vfabric info 2>&1)
info_rc=$?
device="pci:$bdf"
if [ "$info_rc" = 0 ] && echo "$info" | grep -qx " *device: $device"; then
    PCI_OK=1
else
    PCI_OK=0
    why=$(echo "$info" | grep -v '^ *$' | tail -1 | tr -d '\033' | cut -c1-160)
    PCI_WHY="vfabric info (status $info_rc) lists no device $device: ${why:-no output}"
fi
needs_pci() { # NAME: SKIP or FAIL NAME when the pci transport is missing; status 1 then
    [ "$PCI_OK" = 1 ] && return 0
    if [ "${VFABRIC_VM_REQUIRE_PCI:-0}" = 1 ]; then vm_fail "$1 ($PCI_WHY)"; else vm_skip "$1" "$PCI_WHY"; fi
    return 1
}

if needs_pci vfabric-info; then
    if echo "$info" | grep -q "fabric id: $(printf '%x' "$VFABRIC_FABRIC_ID")" &&
        echo "$info" | grep -q "virtio device id $VFABRIC_DEVICE_ID"; then
        vm_pass "vfabric-info ($device, fabric id $(printf '%x' "$VFABRIC_FABRIC_ID"), virtio id $VFABRIC_DEVICE_ID, through QUERY_CAPS)"
    else
        vm_fail "vfabric-info ($(echo "$info" | tail -3 | tr '\n' ' ' | cut -c1-200))"
    fi
fi

# wait_file FILE: up to 60 s for FILE to be non-empty (a server's address file).
wait_file() {
    i=0
    while [ ! -s "$1" ] && [ "$i" -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
    [ -s "$1" ]
}
short() { tail -"${2:-2}" "$1" 2>/dev/null | tr '\n' ' ' | cut -c1-200; }

# A guest and a native process on the host (vhost-user driver) on one vfabricd: guest 0 is the
# client of a host-side `vfabric pingpong --server --verify` (same sizes as the host's).
if [ "$VFABRIC_VM" = 0 ] && needs_pci native-pingpong; then
    vm_native_pingpong_server
    if addr=$(vm_get native-addr 120) && [ -n "$addr" ]; then
        echo "$addr" >/tmp/native.addr
        if timeout 120 vfabric pingpong --device "$device" --addr-file /tmp/native.addr \
            --sizes 8,4k,64k --iters 200 --fixed-iters --verify --quiet >/tmp/native.out 2>&1; then
            vm_pass "native-pingpong (guest client, host server, --verify, sizes 8,4k,64k)"
        else
            vm_fail "native-pingpong ($(short /tmp/native.out))"
        fi
    else
        vm_fail "native-pingpong (no address from the host's native server)"
    fi
fi

[ "$VFABRIC_VMS" = 2 ] || exit 0
other=$((1 - VFABRIC_VM))

# A client/server pair between the guests, guest 0 serving: pair NAME KEY -- SERVER... -- CLIENT...
# runs "SERVER... /tmp/KEY.addr" in guest 0 and "CLIENT... /tmp/KEY.addr" in guest 1 (the
# commands take the address file last); the server's address travels through the mailbox
# (spaces as commas). Output in /tmp/KEY.out.
pair() {
    name=$1 key=$2
    shift 3
    server="" client="" side=server
    for a in "$@"; do
        if [ "$a" = -- ]; then side=client; continue; fi
        eval "$side=\"\$$side \$a\""
    done
    if [ "$VFABRIC_VM" = 0 ]; then
        rm -f /tmp/$key.addr
        # shellcheck disable=SC2086
        timeout 150 $server /tmp/$key.addr >/tmp/$key.out 2>&1 &
        pid=$!
        wait_file /tmp/$key.addr
        vm_put "$key-addr" "$(tr ' ' , </tmp/$key.addr 2>/dev/null)"
        if wait "$pid"; then
            out=$(short /tmp/$key.out 1)
            vm_pass "$name (vm0 serving: ${out:-exit status 0})"
        else
            vm_fail "$name (vm0 serving: $(short /tmp/$key.out))"
        fi
    elif addr=$(vm_get "$key-addr" 180) && [ -n "$addr" ]; then
        echo "$addr" | tr , ' ' >/tmp/$key.addr
        # shellcheck disable=SC2086
        if timeout 150 $client /tmp/$key.addr >/tmp/$key.out 2>&1; then
            vm_pass "$name (vm1 as client: $(short /tmp/$key.out 1))"
            return 0
        else
            vm_fail "$name (vm1 as client: $(short /tmp/$key.out))"
        fi
    else
        vm_fail "$name (no server address from vm$other)"
    fi
    return 1
}

# Messages, tagged messages, RMA read and write, every byte verified.
if ! command -v vf_exchange_test >/dev/null; then
    vm_fail "exchange-vm-vm (vf_exchange_test not in the initramfs: cargo build --examples)"
elif needs_pci exchange-vm-vm; then
    pair exchange-vm-vm x -- vf_exchange_test server "$device" -- vf_exchange_test client "$device"
fi

# vfabric pingpong with every byte verified: polled, then blocking (every wait sleeps on the
# device interrupt through uio). Its numbers are TCG emulation, not performance.
if needs_pci pingpong-vm-vm; then
    common="--sizes 8,4k,64k,1m --iters 100 --warmup 10 --verify --quiet --addr-file"
    # shellcheck disable=SC2086
    if pair pingpong-vm-vm pp -- vfabric pingpong --device "$device" --server $common \
        -- vfabric pingpong --device "$device" $common; then
        sed 's/^/VFABRIC-VM: INFO pp | /' /tmp/pp.out
    fi
fi
if needs_pci pingpong-interrupts-vm-vm; then
    common="--sizes 8,64k --iters 50 --warmup 5 --mode block --verify --quiet --addr-file"
    # shellcheck disable=SC2086
    pair pingpong-interrupts-vm-vm ppb -- vfabric pingpong --device "$device" --server $common \
        -- vfabric pingpong --device "$device" $common
    vm_info "uio interrupts: $(grep uio_pci_generic /proc/interrupts | awk '{print $2}')"
fi

# fi_pingpong -p vfabric between the guests: libfabric with the provider over the pci
# transport; fi_pingpong exchanges the endpoints' addresses over its own TCP control
# connection (eth0, port 47592); -c checks every byte received. Two sizes (8 B: inject; 64 KiB):
# every size (-S all, up to 8 MiB) takes minutes under TCG.
# wait_listen PORT: up to 60 s for a TCP socket listening on PORT (state 0A in /proc/net/tcp).
wait_listen() {
    hex=$(printf '%04X' "$1")
    i=0
    while ! awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" { f = 1 } END { exit !f }' /proc/net/tcp &&
        [ "$i" -lt 300 ]; do
        sleep 0.2
        i=$((i + 1))
    done
}
if [ -z "$VFABRIC_PROVIDER" ] || ! command -v fi_pingpong >/dev/null; then
    vm_fail "fi-pingpong-vm-vm (libvfabric-fi.so or fi_pingpong not in the initramfs)"
elif needs_pci fi-pingpong-vm-vm; then
    for size in 8 65536; do
        fipp="fi_pingpong -p vfabric -e rdm -c -S $size -I 50"
        if [ "$VFABRIC_VM" = 0 ]; then
            # shellcheck disable=SC2086
            timeout 120 $fipp >/tmp/fipp$size.out 2>&1 &
            pid=$!
            wait_listen 47592
            vm_put "fi-pp-$size" ready
            wait "$pid"
        else
            vm_get "fi-pp-$size" 180 >/dev/null
            # shellcheck disable=SC2086
            timeout 120 $fipp "$(peer_ip)" >/tmp/fipp$size.out 2>&1
        fi
        rc=$?
        if [ "$rc" = 0 ]; then
            vm_pass "fi-pingpong-vm-vm ($fipp: $(tail -1 /tmp/fipp$size.out | tr -s ' ' | cut -c1-100))"
            [ "$VFABRIC_VM" = 1 ] && sed 's/^/VFABRIC-VM: INFO fipp | /' /tmp/fipp$size.out
        else
            vm_fail "fi-pingpong-vm-vm ($fipp: status $rc: $(short /tmp/fipp$size.out 3))"
        fi
    done
fi

# Last: guest 1 is killed (SIGKILL to its QEMU) in the middle of a transfer to guest 0. Guest
# 0's transfer must end in an error, not hang, and the daemon must go on serving it.
if [ "$VFABRIC_VM" = 1 ]; then
    if [ "$PCI_OK" = 1 ] && addr=$(vm_get bw-addr 180) && [ -n "$addr" ]; then
        echo "$addr" >/tmp/bw.addr
        vfabric bw --device "$device" --addr-file /tmp/bw.addr --sizes 64k --iters 1000000 \
            --fixed-iters --quiet >/tmp/bw.out 2>&1 &
        bw=$!
        # Long enough for the client to open its device and stream (64 GiB would take hours).
        sleep 8
        kill -0 "$bw" 2>/dev/null ||
            vm_fail "vm-killed-mid-transfer (the client ended before its guest was killed: $(short /tmp/bw.out))"
    fi
    vm_kill_me
fi
if needs_pci vm-killed-mid-transfer; then
    rm -f /tmp/bw.addr
    timeout 150 vfabric bw --device "$device" --server --addr-file /tmp/bw.addr --sizes 64k \
        --iters 1000000 --fixed-iters --timeout-s 20 --quiet >/tmp/bw.out 2>&1 &
    bw=$!
    wait_file /tmp/bw.addr
    vm_put bw-addr "$(cat /tmp/bw.addr 2>/dev/null)"
    vm_get killed1 180 >/dev/null
    wait "$bw"
    rc=$?
    case $rc in
        0) vm_fail "vm-killed-mid-transfer (the transfer to the killed guest succeeded)" ;;
        124 | 137 | 143) vm_fail "vm-killed-mid-transfer (the server hung after its peer died)" ;;
        *)
            # The error must name the peer's loss, not a time-out waiting for a peer that never came.
            if grep -q 'disconnected' /tmp/bw.out; then
                vm_pass "vm-killed-mid-transfer (server failed with status $rc: $(short /tmp/bw.out 1))"
            else
                vm_fail "vm-killed-mid-transfer (status $rc, not a peer error: $(short /tmp/bw.out))"
            fi
            ;;
    esac
fi
if vm_get killed1 180 >/dev/null; then
    fabric=$(devcfg_u32 "$dev" 44)
    if [ "$fabric" = "$VFABRIC_FABRIC_ID" ]; then
        vm_pass "peer-killed (vm1's QEMU was SIGKILLed; this device still answers: fabric_id $(printf '%#x' "$fabric"))"
    else
        vm_fail "peer-killed (device config after vm1 died: fabric_id '$fabric')"
    fi
    # The daemon still serves this guest's driver after its peer died.
    if [ "$PCI_OK" = 1 ]; then
        if out=$(timeout 60 vfabric info 2>&1) && echo "$out" | grep -qx " *device: $device"; then
            vm_pass "device-after-peer-killed (vfabric info reaches $device through the daemon)"
        else
            vm_fail "device-after-peer-killed ($(echo "$out" | tail -2 | tr '\n' ' ' | cut -c1-200))"
        fi
    fi
else
    vm_fail "peer-killed (no word of vm1's death within 180 s)"
fi
exit 0
