#!/bin/bash
# Stand-in for dockerd in the sandbox (Docker cannot run there, DESIGN.md section 7). It programs
# the netfilter state the real daemon programs for one container that publishes
# PUBLISHED_PORT:18080 (docker/compose.yml: "${APPLIANCE_PORT}:18080"), so the role's filter is
# exercised on the same packets: a DNAT rule in nat PREROUTING, a FORWARD path through
# DOCKER-USER, and a listener in the container's own network namespace.
set -euo pipefail
PUBLISHED_PORT=${PUBLISHED_PORT:-18090}
CONTAINER=172.17.0.2
IPT="iptables -w"
log() { echo "dockerd-stub: $*"; }

# The engine's version from the package that is installed (docker-ce or docker.io), with the
# Debian epoch and revision stripped, as the role reads it.
version=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' docker-ce docker.io 2>/dev/null |
    awk '$1 ~ /^.i/ {print $2; exit}' | sed -e 's/^[0-9]*://' -e 's/[-~+].*//' || true)
log "engine $version, DOCKER_INSECURE_NO_IPTABLES_RAW=${DOCKER_INSECURE_NO_IPTABLES_RAW:-unset}"

publish=yes
if dpkg --compare-versions "$version" ge 28.0.0; then
    # JETSON.md: "Docker 28 added rules in iptables' raw table; where CONFIG_IP_NF_RAW ... is
    # missing, port publishing fails"; the opt-out is honoured from 28.0.2 (moby PR 49621).
    if [ "${DOCKER_INSECURE_NO_IPTABLES_RAW:-}" = 1 ] && dpkg --compare-versions "$version" ge 28.0.2; then
        log "raw table rules skipped (DOCKER_INSECURE_NO_IPTABLES_RAW=1)"
    elif ! err=$($IPT -t raw -n -L 2>&1 >/dev/null); then
        log "driver failed programming external connectivity on endpoint appliance: (iptables failed: iptables --wait -t raw -A PREROUTING ...: ${err//$'\n'/ })"
        publish=no
    fi
fi

# Issue 10, defect 7: Docker sets the FORWARD policy to DROP only when it turns forwarding on
# itself; when forwarding was already on (sysctl.d at boot) the policy stays as it was.
if [ "$(sysctl -n net.ipv4.ip_forward)" = 0 ]; then
    sysctl -qw net.ipv4.ip_forward=1
    $IPT -P FORWARD DROP
fi

# The container: its own network namespace behind a veth, like docker0 and a container.
# nsenter, not `ip netns exec`/`ip -n`, which remount / and fail in the sandbox's chroot.
CTR="nsenter --net=/run/netns/appliance-ctr"
if [ ! -e /run/netns/appliance-ctr ]; then
    ip netns add appliance-ctr
    ip link add ctr0 type veth peer name eth0 netns appliance-ctr
    ip addr add 172.17.0.1/16 dev ctr0
    ip link set ctr0 up
    $CTR ip link set lo up
    $CTR ip addr add "$CONTAINER/16" dev eth0
    $CTR ip link set eth0 up
    $CTR ip route add default via 172.17.0.1
fi

# Docker's filter chains (DOCKER-USER first in FORWARD; Docker never flushes it) and its
# accept rules for the container's traffic.
$IPT -N DOCKER-USER 2>/dev/null || true
$IPT -C FORWARD -j DOCKER-USER 2>/dev/null || $IPT -I FORWARD 1 -j DOCKER-USER
for rule in "-o ctr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" \
    "-o ctr0 -d $CONTAINER/32 -p tcp -m tcp --dport 18080 -j ACCEPT" "-i ctr0 -j ACCEPT"; do
    # shellcheck disable=SC2086
    $IPT -C FORWARD $rule 2>/dev/null || $IPT -A FORWARD $rule
done
# The published port: DNAT to the container, rebuilt on every start as dockerd does.
$IPT -t nat -N DOCKER 2>/dev/null || $IPT -t nat -F DOCKER
$IPT -t nat -C PREROUTING -m addrtype --dst-type LOCAL -j DOCKER 2>/dev/null ||
    $IPT -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
if [ "$publish" = yes ]; then
    $IPT -t nat -A DOCKER -p tcp -m tcp --dport "$PUBLISHED_PORT" -j DNAT --to-destination "$CONTAINER:18080"
    log "published $PUBLISHED_PORT -> $CONTAINER:18080"
fi

$CTR python3 -m http.server 18080 --bind 0.0.0.0 --directory /srv &
# Ready, from the unit's main process itself (a short-lived systemd-notify could exit before
# systemd reads its message). The process keeps this environment: the role reads it from
# /proc/PID/environ.
exec python3 -c '
import os, socket, time
address = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect("\0" + address[1:] if address.startswith("@") else address)
s.send(b"READY=1")
while True:
    time.sleep(3600)
'
