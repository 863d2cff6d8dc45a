#!/bin/sh
# busybox udhcpc's event script in the e2e test guest: configure eth0 from the lease and
# remember the host's bridge address for /init: the router, or on an isolated libvirt network
# (which announces none) the DHCP server, libvirt's dnsmasq on that same address.
case "$1" in
bound | renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    router=${router%% *}
    [ -n "$router" ] && ip route add default via "$router" 2> /dev/null
    echo "${router:-$serverid}" > /run/router
    echo "$ip" > /run/ip
    ;;
esac
exit 0
