#!/usr/bin/env bash
# The VM test: real QEMU guests (TCG) reach a host vfabricd through QEMU's generic vhost-user
# device and report one "VFABRIC-VM: PASS|FAIL|SKIP name" line per check on their serial
# console. Everything it needs comes as Debian packages fetched with `apt-get download` into a
# cache directory (private APT configuration; nothing installed system-wide, the system's apt
# sources untouched). Run `scripts/vm-test.sh --help` for the options.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/vm-test.sh [OPTIONS]

Boots 1 or 2 QEMU guests (TCG, q35) whose virtio-fabric device is a host vfabricd reached
through QEMU's generic vhost-user device, runs a guest-side script in each and checks the
"VFABRIC-VM: PASS|FAIL|SKIP name" lines they print. Exit status 0 only if every guest finished
and no check failed (SKIPs are reported, not failures); 1 otherwise; 2 on bad usage.

Options:
  --bins DIR          the project's binaries: DIR/vfabric (required), DIR/vfabricd (host daemon,
                      required), DIR/vf_*_test, DIR/examples/vf_exchange_test and
                      DIR/prov/libvfabric-fi.so (optional; their checks FAIL without them)
                      [default: <repo>/target/debug]
  --guest-script FILE guest-side script run in every guest instead of the default checks
                      (scripts/vm/guest-checks.sh); it may source /etc/vfabric/lib.sh (vm_pass,
                      vm_fail, vm_skip, vm_put/vm_get between guests, fabric_pci_dev, devcfg_u32,
                      ...); see scripts/vm/lib.sh for the variables a guest gets
  --vms N             guests to boot, 1 or 2 (2: each on its own device of one vfabricd, with a
                      mailbox between them and a private Ethernet link) [default: 2]
  --device-id N       virtio device id for vfabricd --device-id, QEMU's virtio-id and the
                      guests' VFABRIC_DEVICE_ID [default: 38, QEMU's stand-in; QEMU 8.2-11.1
                      abort on the provisional 56]
  --fabric-id ID      vfabricd --fabric-id, checked in the guests' device config [0x5eed1e55]
  --timeout SECONDS   hard limit for the guests' run (boot to power-off) [default: 300]
  --mem MB            guest memory per VM [default: 512]
  --cache DIR         download/unpack cache [default: $VFABRIC_VM_CACHE or /var/cache/vfabric-vm]
  --refresh           fetch the packages again even if the cache has them
  --work DIR          working directory (initramfs, logs, sockets) [default: a new temp dir]
  --keep              keep the working directory (logs, initramfs) after the run
  --fetch-only        fetch and unpack the packages into the cache, then exit
  --require-pci       checks that need the driver's pci transport FAIL instead of SKIP when
                      the guest's vfabric finds no PCI device
  --append ARGS       extra guest kernel command-line arguments
  -h, --help          this text

Environment passed on: VFABRIC_VM_DAEMON_ARGS (extra vfabricd arguments).
Guest consoles are in WORK/vmN.log, the daemon's log in WORK/vfabricd.log.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BINS=$ROOT/target/debug
GUEST_SCRIPT=$ROOT/scripts/vm/guest-checks.sh
VMS=2
DEVICE_ID=38
FABRIC_ID=0x5eed1e55
TIMEOUT=300
MEM_MB=512
CACHE=${VFABRIC_VM_CACHE:-/var/cache/vfabric-vm}
REFRESH=0
WORK=""
KEEP=0
FETCH_ONLY=0
APPEND=""
REQUIRE_PCI=0

die() {
    echo "vm-test: $*" >&2
    exit 1
}
need_arg() { [ $# -ge 2 ] || { echo "vm-test: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case $1 in
        --bins) need_arg "$@"; BINS=$2; shift 2 ;;
        --guest-script) need_arg "$@"; GUEST_SCRIPT=$2; shift 2 ;;
        --vms) need_arg "$@"; VMS=$2; shift 2 ;;
        --device-id) need_arg "$@"; DEVICE_ID=$2; shift 2 ;;
        --fabric-id) need_arg "$@"; FABRIC_ID=$2; shift 2 ;;
        --timeout) need_arg "$@"; TIMEOUT=$2; shift 2 ;;
        --mem) need_arg "$@"; MEM_MB=$2; shift 2 ;;
        --cache) need_arg "$@"; CACHE=$2; shift 2 ;;
        --refresh) REFRESH=1; shift ;;
        --work) need_arg "$@"; WORK=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --fetch-only) FETCH_ONLY=1; shift ;;
        --require-pci) REQUIRE_PCI=1; shift ;;
        --append) need_arg "$@"; APPEND=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "vm-test: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
case $VMS in 1 | 2) ;; *) echo "vm-test: --vms must be 1 or 2" >&2; exit 2 ;; esac
[[ $TIMEOUT =~ ^[0-9]+$ ]] && [ "$TIMEOUT" -gt 0 ] || { echo "vm-test: bad --timeout" >&2; exit 2; }
[[ $MEM_MB =~ ^[0-9]+$ ]] && [ "$MEM_MB" -ge 128 ] || { echo "vm-test: --mem must be >= 128" >&2; exit 2; }
# The virtio-pci device id (0x1040 + id) must be expressible: ids 1..=63.
[[ $DEVICE_ID =~ ^[0-9]+$ ]] && [ "$DEVICE_ID" -ge 1 ] && [ "$DEVICE_ID" -le 63 ] ||
    { echo "vm-test: --device-id must be 1..63" >&2; exit 2; }
FABRIC_ID_DEC=$((FABRIC_ID))
[ "$FABRIC_ID_DEC" -gt 0 ] && [ "$FABRIC_ID_DEC" -le 4294967295 ] ||
    { echo "vm-test: --fabric-id must be 1..=0xffffffff" >&2; exit 2; }
PCI_DEVICE=$(printf '%04x' $((0x1040 + DEVICE_ID)))

log() { echo "vm-test: $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Packages: QEMU from Debian sid (the generic vhost-user device is user-creatable again there),
# the guest kernel and busybox-static from bookworm. Each suite has its own APT configuration
# and state under the cache, so the system's apt sources and package state are never touched.
# ---------------------------------------------------------------------------------------------
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIRROR=${VFABRIC_VM_MIRROR:-http://deb.debian.org/debian}

apt_config() { # DIR SUITE: writes DIR/apt.conf for SUITE
    local d=$1 suite=$2
    mkdir -p "$d"/etc/apt.conf.d "$d"/etc/preferences.d "$d"/etc/sources.list.d \
        "$d"/state/lists/partial "$d"/cache/archives/partial "$d"/debs
    : >"$d"/state/status
    echo "deb [signed-by=$KEYRING] $MIRROR $suite main" >"$d"/etc/sources.list
    cat >"$d"/apt.conf <<EOF
Dir::Etc "$d/etc";
Dir::Etc::main "/dev/null";
Dir::Etc::parts "$d/etc/apt.conf.d";
Dir::Etc::sourcelist "$d/etc/sources.list";
Dir::Etc::sourceparts "$d/etc/sources.list.d";
Dir::Etc::preferencesparts "$d/etc/preferences.d";
Dir::State "$d/state";
Dir::State::status "$d/state/status";
Dir::Cache "$d/cache";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Install-Recommends "false";
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::Retries "3";
// As this machine's own apt configuration: a mirror snapshot may lag the clock.
Acquire::Check-Valid-Until "false";
Acquire::Check-Date "false";
EOF
}

# apt-get for one suite's private configuration.
apt_in() { local d=$1; shift; APT_CONFIG=$d/apt.conf apt-get -q "$@"; }
# apt-get update that fails loudly: apt reports an unreachable mirror as a warning only.
apt_update() { # DIR SUITE
    if ! apt_in "$1" update >"$1"/update.log 2>&1 || grep -q '^[WE]: ' "$1"/update.log; then
        cat "$1"/update.log >&2
        die "apt-get update of Debian $2 ($MIRROR) failed: no network or mirror? The VM test cannot run without its packages."
    fi
}

fetch_qemu() {
    local d=$CACHE/apt-sid q=$CACHE/qemu
    apt_config "$d" sid
    log "fetching QEMU from Debian sid into $CACHE"
    apt_update "$d" sid
    # The whole dependency closure on an empty system: the unpacked QEMU runs through its own
    # dynamic loader and libraries, independent of the host's (older) ones.
    local pkgs
    pkgs=$(apt_in "$d" -s install qemu-system-x86 | awk '/^Inst /{print $2}') || true
    [ -n "$pkgs" ] || die "cannot resolve qemu-system-x86 in sid"
    rm -f "$d"/debs/*.deb
    # shellcheck disable=SC2086
    (cd "$d"/debs && apt_in "$d" download $pkgs >"$d"/download.log 2>&1) ||
        { tail -20 "$d"/download.log >&2; die "apt-get download (sid) failed"; }
    rm -rf "$q" && mkdir -p "$q"
    for deb in "$d"/debs/*.deb; do dpkg -x "$deb" "$q"; done
    rm -rf "$d"/debs/*.deb "$d"/state/lists "$d"/cache # ~150 MB of package lists, not needed again
    echo "$(echo "$pkgs" | wc -w) packages" >"$q"/.fetched
}

fetch_guest() {
    local d=$CACHE/apt-bookworm k=$CACHE/guest
    apt_config "$d" bookworm
    log "fetching the guest kernel and busybox-static from Debian bookworm into $CACHE"
    apt_update "$d" bookworm
    local kpkg
    kpkg=$(APT_CONFIG=$d/apt.conf apt-cache depends linux-image-amd64 |
        awk '/Depends: linux-image-[0-9]/{print $2; exit}') || true
    [ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 in bookworm"
    rm -f "$d"/debs/*.deb
    (cd "$d"/debs && apt_in "$d" download "$kpkg" busybox-static >"$d"/download.log 2>&1) ||
        { tail -20 "$d"/download.log >&2; die "apt-get download (bookworm) failed"; }
    rm -rf "$k" && mkdir -p "$k"/root
    dpkg -x "$d"/debs/busybox-static_*.deb "$k"/root
    # Only the kernel and the modules a guest loads (the whole package unpacks to ~400 MB).
    dpkg-deb --fsys-tarfile "$d"/debs/"$kpkg"_*.deb | tar -x -C "$k"/root --wildcards \
        './boot/vmlinuz-*' './lib/modules/*/modules.builtin' \
        './lib/modules/*/kernel/drivers/uio/uio.ko' './lib/modules/*/kernel/drivers/uio/uio_pci_generic.ko' \
        './lib/modules/*/kernel/drivers/vfio/*.ko' \
        './lib/modules/*/kernel/virt/lib/irqbypass.ko' \
        './lib/modules/*/kernel/drivers/net/ethernet/intel/e1000/e1000.ko'
    rm -rf "$d"/debs/*.deb "$d"/state/lists "$d"/cache
    echo "$kpkg" >"$k"/.fetched
}

QEMU_ROOT=$CACHE/qemu
GUEST_ROOT=$CACHE/guest/root
qemu_run() { # runs the unpacked QEMU through its own loader and libraries
    local lib=$QEMU_ROOT/usr/lib/x86_64-linux-gnu
    "$lib"/ld-linux-x86-64.so.2 --library-path "$lib" "$QEMU_ROOT"/usr/bin/qemu-system-x86_64 \
        -L "$QEMU_ROOT"/usr/share/qemu -L "$QEMU_ROOT"/usr/share/seabios "$@"
}
# The same, replacing the calling (sub)shell: `qemu_exec ... &` makes $! QEMU's own pid (the
# loader runs QEMU in its process), so a signal to it reaches QEMU, not a wrapper shell.
qemu_exec() {
    local lib=$QEMU_ROOT/usr/lib/x86_64-linux-gnu
    exec "$lib"/ld-linux-x86-64.so.2 --library-path "$lib" "$QEMU_ROOT"/usr/bin/qemu-system-x86_64 \
        -L "$QEMU_ROOT"/usr/share/qemu -L "$QEMU_ROOT"/usr/share/seabios "$@"
}

mkdir -p "$CACHE"
exec 9>"$CACHE"/.lock
flock 9 # one fetch at a time per cache
if [ "$REFRESH" = 1 ] || [ ! -f "$QEMU_ROOT"/.fetched ] || ! qemu_run --version >/dev/null 2>&1; then
    fetch_qemu
fi
if [ "$REFRESH" = 1 ] || [ ! -f "$CACHE"/guest/.fetched ] || [ ! -x "$GUEST_ROOT"/bin/busybox ]; then
    fetch_guest
fi
# The kernel uncompressed, booted through its PVH entry: under TCG, SeaBIOS's bzImage path and
# the in-guest xz decompression take ~10 s of a ~20 s boot. Kept beside the bzImage; the
# bzImage is used when extraction fails.
if [ ! -s "$CACHE"/guest/vmlinux ]; then
    bz=$(ls "$GUEST_ROOT"/boot/vmlinuz-* | head -1)
    xz_at=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" 2>/dev/null | head -1 | cut -d: -f1) || true
    if [ -n "$xz_at" ]; then
        # xz complains about the bytes after its stream; the ELF image before them is whole.
        tail -c +$((xz_at + 1)) "$bz" | xz -dc >"$CACHE"/guest/vmlinux.new 2>/dev/null || true
        if [ "$(head -c 4 "$CACHE"/guest/vmlinux.new | od -An -c | tr -d ' ')" = '177ELF' ]; then
            mv "$CACHE"/guest/vmlinux.new "$CACHE"/guest/vmlinux
        fi
    fi
    rm -f "$CACHE"/guest/vmlinux.new
    [ -s "$CACHE"/guest/vmlinux ] || log "could not extract an uncompressed kernel: booting the bzImage (slower)"
fi
flock -u 9

QEMU_VERSION=$(qemu_run --version | head -1)
VMLINUZ=$(ls "$GUEST_ROOT"/boot/vmlinuz-* | head -1)
KVER=${VMLINUZ##*/vmlinuz-}
KERNEL=$VMLINUZ
[ -s "$CACHE"/guest/vmlinux ] && KERNEL=$CACHE/guest/vmlinux
MODDIR=$GUEST_ROOT/lib/modules/$KVER
BUSYBOX=$GUEST_ROOT/bin/busybox
# sid changes daily: look the generic device up by name rather than trusting a version.
DEVICE_HELP=$(qemu_run -device help 2>&1)
if grep -q '"vhost-user-test-device-pci"' <<<"$DEVICE_HELP"; then
    VHOST_DEVICE=vhost-user-test-device-pci
elif grep -q '"vhost-user-device-pci"' <<<"$DEVICE_HELP"; then
    VHOST_DEVICE=vhost-user-device-pci
else
    die "$QEMU_VERSION has no generic vhost-user device (vhost-user-test-device-pci / vhost-user-device-pci); try --refresh"
fi
qemu_run -accel help 2>&1 | grep -qx tcg || die "$QEMU_VERSION lacks TCG"
log "$QEMU_VERSION ($VHOST_DEVICE), guest kernel $KVER ($([ "$KERNEL" = "$VMLINUZ" ] && echo bzImage || echo "uncompressed, PVH entry")), $("$BUSYBOX" | head -1 | cut -d' ' -f1-2)"
[ "$FETCH_ONLY" = 1 ] && exit 0

# ---------------------------------------------------------------------------------------------
# Working directory, clean-up
# ---------------------------------------------------------------------------------------------
[ -x "$BINS"/vfabric ] || die "$BINS/vfabric not found (cargo build --workspace --bins, or --bins DIR)"
[ -x "$BINS"/vfabricd ] || die "$BINS/vfabricd not found (cargo build --workspace --bins, or --bins DIR)"
[ -f "$GUEST_SCRIPT" ] || die "guest script $GUEST_SCRIPT not found"
if [ -z "$WORK" ]; then WORK=$(mktemp -d /tmp/vfabric-vm.XXXXXX); else mkdir -p "$WORK"; fi
WORK=$(cd "$WORK" && pwd)
PIDS=()
DAEMON_PID=""
NATIVE_PID=""
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}" $NATIVE_PID $DAEMON_PID; do kill "$p" 2>/dev/null || true; done
    sleep 0.2
    for p in "${PIDS[@]}" $NATIVE_PID $DAEMON_PID; do kill -9 "$p" 2>/dev/null || true; done
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------------------------------------
# Initramfs: busybox, the project's binaries with their library closure, the modules
# ---------------------------------------------------------------------------------------------
STAGE=$WORK/initramfs
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,mnt,etc/vfabric,opt/vfabric/bin,opt/vfabric/prov,lib/modules}
cp "$BUSYBOX" "$STAGE"/bin/busybox
ln -s busybox "$STAGE"/bin/sh

# Copy a host file to the same path in the initramfs (symlinks resolved).
stage_file() { [ -e "$STAGE$1" ] || { mkdir -p "$STAGE$(dirname "$1")"; cp -L "$1" "$STAGE$1"; }; }
# An ELF file and every library ldd finds for it, at their host paths.
stage_closure() {
    local f
    for f in $(ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^\t\//{print $1}'); do
        stage_file "$f"
    done
}
# A binary, stripped of debug info (debug builds are ~60 MB otherwise), plus its libraries.
stage_bin() { # SRC DEST
    strip --strip-debug -o "$STAGE$2" "$1" 2>/dev/null || cp "$1" "$STAGE$2"
    stage_closure "$1"
}
stage_bin "$BINS"/vfabric /opt/vfabric/bin/vfabric
# The C test programs (DIR/vf_*_test) and the driver's example vf_exchange_test (cargo build
# --examples puts it in DIR/examples).
for t in "$BINS"/vf_*_test "$BINS"/examples/vf_exchange_test; do
    if [ -x "$t" ]; then stage_bin "$t" "/opt/vfabric/bin/${t##*/}"; fi
done
PROVIDER=""
if [ -f "$BINS"/prov/libvfabric-fi.so ]; then
    stage_bin "$BINS"/prov/libvfabric-fi.so /opt/vfabric/prov/libvfabric-fi.so
    PROVIDER=/opt/vfabric/prov/libvfabric-fi.so
fi
for tool in fi_pingpong fi_info; do
    if command -v "$tool" >/dev/null; then stage_bin "$(command -v "$tool")" "/usr/bin/$tool"; fi
done

# Modules in dependency order (from each module's own depends= field: there is no modules.dep).
MODULES=()
add_module() {
    local name=$1 f dep
    for m in "${MODULES[@]}"; do [ "$m" = "$name" ] && return 0; done
    f=$(find "$MODDIR" -name "$name.ko" | head -1)
    [ -n "$f" ] || die "module $name not in $MODDIR"
    for dep in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | tr ',' ' '); do add_module "$dep"; done
    MODULES+=("$name")
    cp "$f" "$STAGE"/lib/modules/
}
for m in uio_pci_generic vfio-pci vfio_iommu_type1 e1000; do add_module "$m"; done
printf '%s\n' "${MODULES[@]}" >"$STAGE"/etc/vfabric/modules

cp "$ROOT"/scripts/vm/init "$STAGE"/init
cp "$ROOT"/scripts/vm/lib.sh "$STAGE"/etc/vfabric/lib.sh
cp "$GUEST_SCRIPT" "$STAGE"/etc/vfabric/guest.sh
chmod +x "$STAGE"/init "$STAGE"/etc/vfabric/guest.sh
NUM_QUEUE_PAIRS=2
cat >"$STAGE"/etc/vfabric/vm.env <<EOF
VFABRIC_VMS=$VMS
VFABRIC_DEVICE_ID=$DEVICE_ID
VFABRIC_PCI_DEVICE=$PCI_DEVICE
VFABRIC_FABRIC_ID=$FABRIC_ID_DEC
VFABRIC_NUM_QUEUE_PAIRS=$NUM_QUEUE_PAIRS
VFABRIC_PROVIDER=$PROVIDER
VFABRIC_VM_REQUIRE_PCI=$REQUIRE_PCI
VFABRIC_QEMU="$QEMU_VERSION"
EOF
(cd "$STAGE" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1 >"$WORK"/initramfs.gz)
log "initramfs $(du -h "$WORK"/initramfs.gz | cut -f1) (${#MODULES[@]} modules: ${MODULES[*]})"

# ---------------------------------------------------------------------------------------------
# Host daemon and guests
# ---------------------------------------------------------------------------------------------
T0=$(date +%s.%N)
mkdir -p "$WORK"/sock
# shellcheck disable=SC2086
# One device per guest, and one more (vfabric$VMS.sock) for a native process on the host.
"$BINS"/vfabricd --socket-dir "$WORK"/sock --devices $((VMS + 1)) --device-id "$DEVICE_ID" \
    --fabric-id "$FABRIC_ID" --num-queue-pairs "$NUM_QUEUE_PAIRS" --handshake-timeout 0 \
    ${VFABRIC_VM_DAEMON_ARGS:-} >"$WORK"/vfabricd.log 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do
    [ -S "$WORK"/sock/vfabric$VMS.sock ] && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK"/vfabricd.log >&2; die "vfabricd exited"; }
    sleep 0.1
done
[ -S "$WORK"/sock/vfabric$VMS.sock ] || die "vfabricd did not create its sockets"
NATIVE_SOCK=$WORK/sock/vfabric$VMS.sock

NUM_VQS=$((1 + 2 * NUM_QUEUE_PAIRS))
for ((i = 0; i < VMS; i++)); do
    # Mailbox: the guest's ttyS1 reads what the host relays from the other guest (a FIFO the host
    # keeps open read-write, so QEMU's open does not block) and writes to a file nobody needs.
    mkfifo "$WORK"/vm$i.mbox
    exec {fd}<>"$WORK"/vm$i.mbox
    eval "MBOX_FD_$i=$fd"
    net=()
    if [ "$VMS" = 2 ]; then
        # A private Ethernet link between the two guests: unix datagram sockets on the host.
        net=(-netdev "dgram,id=n0,local.type=unix,local.path=$WORK/net$i,remote.type=unix,remote.path=$WORK/net$((1 - i))"
            -device "e1000,netdev=n0,mac=52:54:00:00:00:0$((i + 1))")
    fi
    qemu_exec -machine q35,accel=tcg -cpu max -smp 1 -m "$MEM_MB"M \
        -object memory-backend-memfd,id=mem,size="$MEM_MB"M,share=on -numa node,memdev=mem \
        -nodefaults -no-user-config -display none -no-reboot \
        -chardev file,id=con,path="$WORK"/vm$i.log -serial chardev:con \
        -chardev file,id=mbox,path="$WORK"/vm$i.mbox-out,input-path="$WORK"/vm$i.mbox -serial chardev:mbox \
        -chardev socket,id=vf,path="$WORK"/sock/vfabric$i.sock \
        -device "$VHOST_DEVICE",chardev=vf,virtio-id="$DEVICE_ID",num_vqs="$NUM_VQS",config_size=48 \
        "${net[@]}" \
        -kernel "$KERNEL" -initrd "$WORK"/initramfs.gz -pidfile "$WORK"/qemu$i.pid \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 vfabric.vm=$i $APPEND" \
        >"$WORK"/qemu$i.log 2>&1 &
    PIDS+=($!)
done

# Wait for the guests to power off, relaying "VFABRIC-VM: PUT key value" lines to the other
# guest's mailbox, within the hard deadline.
declare -A RELAYED AT_INIT AT_DONE KILLED
NATIVE_VM="" NATIVE_ADDR_SENT=""
# Must match the guest's client (scripts/vm/guest-checks.sh).
NATIVE_SIZES=8,4k,64k
deadline=$(($(date +%s) + TIMEOUT))
TIMED_OUT=0
while :; do
    running=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && running=1; done
    if [ "$VMS" = 2 ]; then
        for ((i = 0; i < VMS; i++)); do
            # Hold the messages until the receiving guest reads its mailbox.
            grep -q '^VFABRIC-VM: MAILBOX-READY' "$WORK"/vm$((1 - i)).log 2>/dev/null || continue
            # Complete lines only (they end with " ."): the console log may hold half a line.
            n=$(grep -c '^VFABRIC-VM: PUT .* \.[[:cntrl:]]*$' "$WORK"/vm$i.log 2>/dev/null || true)
            while [ "${RELAYED[$i]:-0}" -lt "${n:-0}" ]; do
                RELAYED[$i]=$((${RELAYED[$i]:-0} + 1))
                line=$(grep '^VFABRIC-VM: PUT .* \.[[:cntrl:]]*$' "$WORK"/vm$i.log | sed -n "${RELAYED[$i]}p" | tr -d '\r')
                fd_var=MBOX_FD_$((1 - i))
                echo "${line#VFABRIC-VM: PUT }" >&"${!fd_var}"
            done
        done
    fi
    # Host-side timing: when each guest reached /init and when it finished its checks.
    for ((i = 0; i < VMS; i++)); do
        [ -n "${AT_INIT[$i]:-}" ] || ! grep -q '^VFABRIC-VM: INFO boot' "$WORK"/vm$i.log 2>/dev/null ||
            AT_INIT[$i]=$(date +%s.%N)
        [ -n "${AT_DONE[$i]:-}" ] || ! grep -q '^VFABRIC-VM: DONE' "$WORK"/vm$i.log 2>/dev/null ||
            AT_DONE[$i]=$(date +%s.%N)
    done
    # A guest that asks to be killed (vm_kill_me) loses its QEMU to SIGKILL, as a crashed VM
    # would; the other guest hears "killedN yes" through its mailbox.
    for ((i = 0; i < VMS; i++)); do
        if [ -z "${KILLED[$i]:-}" ] && grep -q '^VFABRIC-VM: KILL-ME' "$WORK"/vm$i.log 2>/dev/null; then
            KILLED[$i]=1
            # PIDS[i] is QEMU itself (qemu_exec); -pidfile is QEMU's own word for it.
            qpid=$(cat "$WORK"/qemu$i.pid 2>/dev/null || true)
            [ "${qpid:-${PIDS[$i]}}" = "${PIDS[$i]}" ] ||
                log "vm$i: QEMU's pid file says ${qpid}, the runner started ${PIDS[$i]}"
            kill -9 "${PIDS[$i]}" ${qpid:+"$qpid"} 2>/dev/null || true
            wait "${PIDS[$i]}" 2>/dev/null || true
            log "vm$i killed (SIGKILL to its QEMU, pid ${PIDS[$i]}) as it asked"
            # (after the guest's own lines, which it printed first)
            if [ "$VMS" = 2 ]; then fd_var=MBOX_FD_$((1 - i)); echo "killed$i yes ." >&"${!fd_var}"; fi
        fi
    done
    # A guest asking for a native peer ("VFABRIC-VM: NATIVE pingpong") gets a vfabric pingpong
    # server on the host's own device (vhost-user driver), its address through the mailbox.
    for ((i = 0; i < VMS; i++)); do
        if [ -z "$NATIVE_PID" ] && grep -q '^VFABRIC-VM: NATIVE pingpong' "$WORK"/vm$i.log 2>/dev/null; then
            NATIVE_VM=$i
            "$BINS"/vfabric pingpong --device "$NATIVE_SOCK" --server --addr-file "$WORK"/native.addr \
                --sizes "$NATIVE_SIZES" --iters 200 --fixed-iters --verify --quiet --timeout-s 60 \
                >"$WORK"/native.log 2>&1 &
            NATIVE_PID=$!
            log "vm$i asked for a native peer: vfabric pingpong server on $NATIVE_SOCK"
        fi
    done
    if [ -n "$NATIVE_PID" ] && [ -z "$NATIVE_ADDR_SENT" ] && [ -s "$WORK"/native.addr ]; then
        fd_var=MBOX_FD_$NATIVE_VM
        echo "native-addr $(cat "$WORK"/native.addr) ." >&"${!fd_var}"
        NATIVE_ADDR_SENT=1
    fi
    [ "$running" = 0 ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
        TIMED_OUT=1
        log "timeout after ${TIMEOUT}s: killing the guests"
        for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
        break
    fi
    sleep 0.2
done
T1=$(date +%s.%N)

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
FAILED=0
pass=0 fail=0 skip=0
for ((i = 0; i < VMS; i++)); do
    tr -d '\r' <"$WORK"/vm$i.log >"$WORK"/vm$i.clean
    echo "--- vm$i ($QEMU_VERSION, kernel $KVER)"
    grep -E '^VFABRIC-VM: (PASS|FAIL|SKIP|INFO) ' "$WORK"/vm$i.clean || true
    p=$(grep -c '^VFABRIC-VM: PASS ' "$WORK"/vm$i.clean || true)
    f=$(grep -c '^VFABRIC-VM: FAIL ' "$WORK"/vm$i.clean || true)
    s=$(grep -c '^VFABRIC-VM: SKIP ' "$WORK"/vm$i.clean || true)
    pass=$((pass + p)) fail=$((fail + f)) skip=$((skip + s))
    if [ -n "${KILLED[$i]:-}" ]; then
        echo "vm$i: killed on its own request (no DONE line expected)"
    elif ! grep -q '^VFABRIC-VM: DONE' "$WORK"/vm$i.clean; then
        echo "vm$i: did not finish (no DONE line); last console lines:"
        tail -25 "$WORK"/vm$i.clean | sed 's/^/    /'
        tail -5 "$WORK"/qemu$i.log | sed 's/^/    qemu: /'
        FAILED=1
    fi
    [ "$p" -gt 0 ] || { echo "vm$i: no check passed"; FAILED=1; }
    [ "$f" = 0 ] || FAILED=1
done
[ "$TIMED_OUT" = 0 ] || FAILED=1
# The host's side of a guest-native exchange: one more check, counted like the guests'.
if [ -n "$NATIVE_PID" ]; then
    echo "--- host (native vfabric on $NATIVE_SOCK, peer vm$NATIVE_VM)"
    native_why=""
    if kill -0 "$NATIVE_PID" 2>/dev/null; then
        native_why="still waiting for its peer when the guests had finished"
        kill "$NATIVE_PID" 2>/dev/null || true
    fi
    if wait "$NATIVE_PID" 2>/dev/null && [ -z "$native_why" ]; then
        echo "VFABRIC-VM: PASS native-pingpong-host (server on the host, --verify, sizes $NATIVE_SIZES)"
        pass=$((pass + 1))
    else
        echo "VFABRIC-VM: FAIL native-pingpong-host (${native_why:-$(tail -2 "$WORK"/native.log | tr '\n' ' ')})"
        fail=$((fail + 1))
        FAILED=1
    fi
fi
if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    echo "vfabricd died during the run:"; tail -20 "$WORK"/vfabricd.log
    FAILED=1
fi
# Timing (TCG emulation on this host, not a performance figure): QEMU start to the guest's
# /init, /init to the last check, and the whole run from the daemon's start to power-off.
for ((i = 0; i < VMS; i++)); do
    awk -v s="$T0" -v b="${AT_INIT[$i]:-}" -v d="${AT_DONE[$i]:-}" -v i="$i" 'BEGIN {
        printf "vm-test: vm%d TCG timing: boot to /init %s s, checks %s s\n", i,
            (b == "" ? "-" : sprintf("%.1f", b - s)), (b == "" || d == "" ? "-" : sprintf("%.1f", d - b)) }'
done
printf 'vm-test: %d VM(s), %s (%s), kernel %s, TCG: wall %.1f s\n' \
    "$VMS" "$QEMU_VERSION" "$VHOST_DEVICE" "$KVER" "$(awk "BEGIN{print $T1 - $T0}")"
echo "vm-test: $pass passed, $fail failed, $skip skipped"
if [ "$FAILED" != 0 ]; then
    [ "$KEEP" = 1 ] || { KEEP=1; log "failed: keeping $WORK for its logs"; }
    exit 1
fi
