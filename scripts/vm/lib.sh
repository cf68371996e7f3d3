# Helpers for guest scripts of the VM test (sourced: . /etc/vfabric/lib.sh).
#
# Variables a guest gets (from /etc/vfabric/vm.env and the kernel command line):
#   VFABRIC_VM               this guest's index (0 or 1); its device is vfabricd's device N
#   VFABRIC_VMS              number of guests (1 or 2)
#   VFABRIC_DEVICE_ID        virtio device id (38 by default; QEMU's stand-in for 56)
#   VFABRIC_PCI_DEVICE       PCI device id in hex without 0x (0x1040 + id: 1066)
#   VFABRIC_FABRIC_ID        vfabricd --fabric-id, decimal
#   VFABRIC_NUM_QUEUE_PAIRS  vfabricd --num-queue-pairs
#   VFABRIC_PROVIDER         path of libvfabric-fi.so, empty if it was not built
#   FI_PROVIDER_PATH         /opt/vfabric/prov; PATH has /opt/vfabric/bin (vfabric, vf_*_test)
# With two guests, eth0 links them (guest N is 169.254.38.(N+1)/24 after net_up) and
# vm_put/vm_get pass short strings (addresses) from one guest to the other through the host.

# Each result line ends with the guest's uptime in seconds ("@12.3s"): where a run's time goes.
vm_uptime() { cut -d' ' -f1 /proc/uptime; }
vm_pass() { echo "VFABRIC-VM: PASS $* @$(vm_uptime)s"; }
vm_fail() { echo "VFABRIC-VM: FAIL $* @$(vm_uptime)s"; }
# vm_skip NAME REASON: a check that could not run. Never a pass.
vm_skip() { echo "VFABRIC-VM: SKIP $1 ($2) @$(vm_uptime)s"; }
vm_info() { echo "VFABRIC-VM: INFO $*"; }

# vm_put KEY VALUE: make VALUE available to the other guest's vm_get KEY. Every mailbox line ends
# with " ." so that a line still arriving (serial lines come in pieces) is never taken whole.
vm_put() { echo "VFABRIC-VM: PUT $1 $2 ."; }
# vm_get KEY [SECONDS]: print the VALUE the other guest put under KEY; status 1 on timeout.
vm_get() {
    local i=0 limit=$((${2:-60} * 5)) v
    while [ "$i" -lt "$limit" ]; do
        v=$(tr -d '\r' </tmp/mailbox | sed -n "s/^$1 \(.*\) \.\$/\1/p" | tail -1)
        if [ -n "$v" ]; then echo "$v"; return 0; fi
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}

# vm_kill_me: the host SIGKILLs this guest's QEMU (a VM dying mid-run, as the device sees it);
# the other guest's vm_get "killedN" then answers. Never returns; the host expects no DONE line.
vm_kill_me() {
    echo "VFABRIC-VM: KILL-ME"
    sleep 3600
}

# vm_native_pingpong_server: the host starts `vfabric pingpong --server --verify` on its own
# device of the same vfabricd (a native process, vhost-user driver) and puts its address under
# "native-addr" (vm_get native-addr); the host reports its side as native-pingpong-host.
vm_native_pingpong_server() { echo "VFABRIC-VM: NATIVE pingpong"; }

# net_up: bring eth0 up as 169.254.38.(VFABRIC_VM+1)/24 (two guests only).
net_up() {
    ip link set lo up
    ip addr add "169.254.38.$((VFABRIC_VM + 1))/24" dev eth0 && ip link set eth0 up
}
peer_ip() { echo "169.254.38.$((2 - VFABRIC_VM))"; }

# fabric_pci_dev: sysfs directory of the fabric device (vendor 1af4, device 0x1040 + id).
fabric_pci_dev() {
    local d
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = "0x$VFABRIC_PCI_DEVICE" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

# pci_cfg DEV OFFSET SIZE: unsigned little-endian value from PCI config space.
pci_cfg() {
    od -An -tu"$3" -j "$2" -N "$3" "$1/config" | tr -d ' '
}

# virtio_cap DEV CFG_TYPE: "BAR OFFSET LENGTH" of the virtio-pci capability of that type
# (1 common, 2 notify, 3 ISR, 4 device config, 5 PCI config access), walking the list.
virtio_cap() {
    local dev=$1 want=$2 ptr n=0
    [ $(($(pci_cfg "$dev" 6 2) & 0x10)) != 0 ] || return 1
    ptr=$(($(pci_cfg "$dev" 52 1) & 0xfc))
    while [ "$ptr" != 0 ] && [ "$n" -lt 48 ]; do
        if [ "$(pci_cfg "$dev" "$ptr" 1)" = 9 ] && [ "$(pci_cfg "$dev" $((ptr + 3)) 1)" = "$want" ]; then
            echo "$(pci_cfg "$dev" $((ptr + 4)) 1) $(pci_cfg "$dev" $((ptr + 8)) 4) $(pci_cfg "$dev" $((ptr + 12)) 4)"
            return 0
        fi
        ptr=$(($(pci_cfg "$dev" $((ptr + 1)) 1) & 0xfc))
        n=$((n + 1))
    done
    return 1
}

# bar_phys DEV BAR: physical start address of a BAR (decimal).
bar_phys() {
    printf '%d' "$(sed -n "$(($2 + 1))p" "$1/resource" | cut -d' ' -f1)"
}

# devcfg_u32 DEV OFFSET / devcfg_u64 DEV OFFSET: a field of the device-specific configuration
# (struct virtio_fabric_config), read through the device-config capability's BAR window.
devcfg_u32() {
    set -- "$1" "$2" $(virtio_cap "$1" 4)
    [ -n "$3" ] || return 1
    printf '%d' "$(devmem $(($(bar_phys "$1" "$3") + $4 + $2)) 32)"
}
devcfg_u64() {
    local lo hi
    lo=$(devcfg_u32 "$1" "$2") && hi=$(devcfg_u32 "$1" $(($2 + 4))) || return 1
    printf '%d' $(((hi << 32) | lo))
}
