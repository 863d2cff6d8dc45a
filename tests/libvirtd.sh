#!/bin/bash
# Bring up a real libvirtd + QEMU (TCG) without systemd for tests/test_hypervisor_qemu.py.
#
#   bash tests/libvirtd.sh          # install, start daemons, define+start pool and network (idempotent)
#   bash tests/libvirtd.sh stop     # stop pool, network and daemons, and undo what they
#                                   # left: empty LIBVIRT_* iptables chains, ip_forward
#
# Run as root on Debian 12. Follows the measured recipe in real-components.md §3:
#   * Debian 12 has no modular daemons; libvirtd loads every driver (qemu, network, storage).
#     The dir/fs storage backend ships in libvirt-daemon itself (there is no
#     libvirt-daemon-driver-storage package in bookworm).
#   * without libvirt-daemon-system there is no libvirt-qemu user, and libvirtd refuses to
#     start the QEMU driver; qemu.conf user=root avoids a 4 s capability re-probe per call.
#   * the network is isolated (no <forward>): guests reach only the host's bridge IP, and
#     dnsmasq's ping check is off so fresh MACs get a lease at once.
#   * net-destroy removes the network's firewall rules but leaves libvirt's LIBVIRT_* chains
#     and the jumps to them, and never resets net.ipv4.ip_forward (a NAT network sets it);
#     `stop` removes the chains that are empty and restores ip_forward as it was first found.
# Names: pool "monitor-test" (/var/lib/libvirt/images/monitor-test), network "monitor-test"
# (bridge virbr151, 192.168.151.0/24, DHCP .20-.250, 10-minute leases).
set -euo pipefail

URI=qemu:///system
POOL=monitor-test
POOL_DIR=/var/lib/libvirt/images/monitor-test
NET=monitor-test
BRIDGE=virbr151
# What the machine was like before this script first started anything (tmpfs: gone on reboot).
STATE_DIR=/run/monitor-test-libvirtd
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
          dnsmasq-base iptables busybox-static)

T0=$(date +%s.%N)
LAST=$T0
step() {  # print the time since the previous step
    local now; now=$(date +%s.%N)
    awk -v a="$LAST" -v b="$now" -v what="$1" 'BEGIN{printf "libvirtd.sh: %-34s %6.2f s\n", what, b - a}'
    LAST=$now
}
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; }
virsh_q() { virsh -q -c "$URI" "$@"; }
ensure() {  # ensure IS_UP START_CMD NAME: libvirtd autostarts pools and networks in the
    # background, so a start can fail with "already active" while the object is not up yet.
    local i
    for i in $(seq 1 100); do
        "$1" && return 0
        virsh_q "$2" "$3" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "libvirtd.sh: $2 $3 failed: $(virsh_q "$2" "$3" 2>&1)" >&2
    return 1
}

remove_empty_libvirt_chains() {
    # Only empty ones: a chain still holding rules belongs to another active libvirt network.
    local cmd table chain rule
    for cmd in iptables ip6tables; do
        command -v "$cmd" >/dev/null || continue
        for table in filter nat mangle; do
            for chain in $("$cmd" -t "$table" -S 2>/dev/null \
                    | awk '$1 == "-N" && $2 ~ /^LIBVIRT_/ {print $2}'); do
                [ "$("$cmd" -t "$table" -S "$chain" | wc -l)" = 1 ] || continue
                { "$cmd" -t "$table" -S | grep -E -- "^-A [^ ]+ (.* )?-j $chain\$" || true; } \
                    | while read -r rule; do
                        # shellcheck disable=SC2086 # the rule's words, as iptables -S wrote them
                        "$cmd" -t "$table" -D ${rule#-A }
                    done
                "$cmd" -t "$table" -X "$chain"
            done
        done
    done
}

if [ "$(id -u)" != 0 ]; then
    echo "libvirtd.sh: must run as root" >&2
    exit 1
fi

if [ "${1:-start}" = stop ]; then
    if alive /run/libvirtd.pid; then
        virsh_q net-destroy "$NET" >/dev/null 2>&1 || true
        virsh_q pool-destroy "$POOL" >/dev/null 2>&1 || true
        kill "$(cat /run/libvirtd.pid)"
    fi
    alive /run/virtlogd.pid && kill "$(cat /run/virtlogd.pid)"
    for i in $(seq 1 100); do
        alive /run/libvirtd.pid || alive /run/virtlogd.pid || break
        sleep 0.05
    done
    step "stopped"
    remove_empty_libvirt_chains
    if [ -f "$STATE_DIR/ip_forward" ]; then
        cat "$STATE_DIR/ip_forward" > /proc/sys/net/ipv4/ip_forward
        rm -f "$STATE_DIR/ip_forward"
    fi
    step "firewall chains and ip_forward"
    exit 0
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
step "packages (${#missing[@]} missing)"

getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 \
    || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /etc/libvirt "$POOL_DIR"
touch /etc/libvirt/qemu.conf
grep -qE '^\s*user\s*=' /etc/libvirt/qemu.conf || echo 'user = "root"' >> /etc/libvirt/qemu.conf
grep -qE '^\s*group\s*=' /etc/libvirt/qemu.conf || echo 'group = "root"' >> /etc/libvirt/qemu.conf

mkdir -p "$STATE_DIR"
[ -f "$STATE_DIR/ip_forward" ] || cat /proc/sys/net/ipv4/ip_forward > "$STATE_DIR/ip_forward"
alive /run/virtlogd.pid || virtlogd -d
alive /run/libvirtd.pid || LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log" libvirtd -d
for i in $(seq 1 1200); do
    virsh -c "$URI" version >/dev/null 2>&1 && break
    if [ "$i" = 1200 ]; then
        echo "libvirtd.sh: libvirtd not ready after 60 s; see /var/log/libvirt/libvirtd.log" >&2
        exit 1
    fi
    sleep 0.05
done
step "daemons ready"

if ! virsh -c "$URI" pool-info "$POOL" >/dev/null 2>&1; then
    virsh_q pool-define-as "$POOL" dir --target "$POOL_DIR" >/dev/null
    virsh_q pool-autostart "$POOL" >/dev/null
fi
pool_up() { virsh -c "$URI" pool-info "$POOL" | grep -q 'State:.*running'; }
ensure pool_up pool-start "$POOL"
step "storage pool $POOL"

# Every test guest gets a fresh MAC, so each takes a new lease: leases of 10 minutes over a
# wide range keep repeated test runs from exhausting it (the test guests never renew theirs, so
# a lease must outlive the longest test guest). A network defined with other leases (an older
# version of this script gave hour-long ones) is defined again.
if virsh -c "$URI" net-dumpxml "$NET" >/dev/null 2>&1 \
        && ! virsh -c "$URI" net-dumpxml "$NET" | grep -q "<lease expiry='10'"; then
    virsh_q net-destroy "$NET" >/dev/null 2>&1 || true
    virsh_q net-undefine "$NET" >/dev/null
fi
if ! virsh -c "$URI" net-info "$NET" >/dev/null 2>&1; then
    NET_XML=$(mktemp)
    cat > "$NET_XML" <<EOF
<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'>
  <name>$NET</name>
  <bridge name='$BRIDGE' stp='off' delay='0'/>
  <ip address='192.168.151.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.151.20' end='192.168.151.250'><lease expiry='10' unit='minutes'/></range>
    </dhcp>
  </ip>
  <dnsmasq:options><dnsmasq:option value='no-ping'/></dnsmasq:options>
</network>
EOF
    virsh_q net-define "$NET_XML" >/dev/null
    rm -f "$NET_XML"
    virsh_q net-autostart "$NET" >/dev/null
fi
net_up() { virsh -c "$URI" net-info "$NET" | grep -q 'Active:.*yes'; }
ensure net_up net-start "$NET"
step "network $NET ($BRIDGE)"

LAST=$T0
step "total"
