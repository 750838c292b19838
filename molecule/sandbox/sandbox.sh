#!/usr/bin/env bash
# Sandbox hosts for molecule: a Debian root filesystem booted with systemd as
# PID 1 in its own pid/mount/uts/ipc namespaces and its own network namespace,
# joined to the controller by a veth pair (DESIGN.md section 7).
#
#   sandbox.sh create NAME INDEX   make and boot one host at 10.213.INDEX.2
#   sandbox.sh destroy NAME        stop it and remove everything it used
#   sandbox.sh assert-clean NAME   fail if anything of NAME is left behind
#   sandbox.sh rootfs              only build (or reuse) the cached rootfs tarball
#
# Environment:
#   APPLIANCE_SANDBOX_CACHE   tarball cache (default ${XDG_CACHE_HOME:-~/.cache}/appliance-sandbox)
#   APPLIANCE_SANDBOX_STATE   per-host roots, pids, ssh key (default /run/appliance-sandbox)
#   APPLIANCE_SANDBOX_MIRROR  Debian mirror (default: the first one apt is configured with)
#
# Only addresses 10.213.INDEX.0/30 are used: .1 is the controller's end of the
# veth, .2 the sandbox's. Nothing else on the network is touched.
set -euo pipefail

CACHE_DIR=${APPLIANCE_SANDBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance-sandbox}
STATE_DIR=${APPLIANCE_SANDBOX_STATE:-/run/appliance-sandbox}
SUITE=bookworm
# The package list is part of the cache key: changing it builds a new tarball. python3-pip:
# the jtop role pip-installs jetson-stats for real (from wheels the controller brings).
PACKAGES=systemd,systemd-sysv,dbus,openssh-server,python3,python3-apt,python3-pip,iproute2,iptables,curl,kmod,procps
CACHE_KEY=$(printf '%s %s' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
TARBALL=$CACHE_DIR/$SUITE-minbase-$CACHE_KEY.tar.gz
SUBNET_PREFIX=10.213

log() { printf 'sandbox: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

apt_mirror() {
    if [[ -n ${APPLIANCE_SANDBOX_MIRROR:-} ]]; then
        echo "$APPLIANCE_SANDBOX_MIRROR"
        return
    fi
    local url
    url=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
            /etc/apt/sources.list.d/*.list 2>/dev/null |
          grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ' || true)
    echo "${url:-http://deb.debian.org/debian}"
}

build_rootfs() {
    [[ -s $TARBALL ]] && return 0
    command -v debootstrap >/dev/null || die "debootstrap is not installed"
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.lock"
    flock 9
    [[ -s $TARBALL ]] && return 0
    local tmp mirror
    tmp=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
    mirror=$(apt_mirror)
    log "debootstrap $SUITE from $mirror (once; cached in $TARBALL)"
    if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/root" "$mirror" \
            >"$tmp/debootstrap.log" 2>&1; then
        tail -n 20 "$tmp/debootstrap.log" >&2
        rm -rf "$tmp"
        die "debootstrap failed"
    fi
    # Smaller tarball, faster unpack: documentation and apt lists are not needed.
    rm -rf "$tmp/root/usr/share/doc" "$tmp/root/usr/share/man" "$tmp/root/usr/share/locale" \
        "$tmp/root/var/cache/apt/"*.bin "$tmp/root/var/lib/apt/lists/"*_Packages
    tar -C "$tmp/root" --numeric-owner -cf - . | gzip -1 >"$tmp/rootfs.tar.gz"
    mv "$tmp/rootfs.tar.gz" "$TARBALL"
    rm -rf "$tmp"
    flock -u 9
}

ssh_key() {
    mkdir -p "$STATE_DIR"
    [[ -f $STATE_DIR/id_ed25519 ]] ||
        ssh-keygen -q -t ed25519 -N '' -C appliance-sandbox -f "$STATE_DIR/id_ed25519"
}

netns_name() { echo "asb-$1"; }
veth_name() { echo "asb$1h"; }

create() {
    local name=$1 index=$2
    [[ $name =~ ^[a-z0-9-]{1,20}$ ]] || die "bad host name: $name"
    [[ $index =~ ^[0-9]+$ ]] && ((index >= 1 && index <= 250)) || die "bad index: $index"
    local dir=$STATE_DIR/$name root=$STATE_DIR/$name/root
    local ns veth
    ns=$(netns_name "$name")
    veth=$(veth_name "$index")
    [[ -e $dir/pid ]] && die "$name exists already (destroy it first)"
    ip link show "$veth" >/dev/null 2>&1 && die "link $veth is in use"

    build_rootfs
    ssh_key
    mkdir -p "$root"
    tar -C "$root" --numeric-owner -xzf "$TARBALL"
    echo "$name" >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$name" >"$root/etc/hosts"
    install -d -m 700 "$root/root/.ssh"
    install -m 600 "$STATE_DIR/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
    # Each host gets its own ssh host keys and machine id.
    rm -f "$root"/etc/ssh/ssh_host_*
    ssh-keygen -q -A -f "$root"
    : >"$root/etc/machine-id"
    # Units that cannot work without real hardware or a real console.
    for unit in getty@tty1.service serial-getty@.service console-getty.service \
        systemd-logind.service systemd-timesyncd.service \
        apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done

    ip netns add "$ns"
    echo "$ns" >"$dir/netns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    echo "$veth" >"$dir/veth"
    ip addr add "$SUBNET_PREFIX.$index.1/30" dev "$veth"
    ip link set "$veth" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$SUBNET_PREFIX.$index.2/30" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$SUBNET_PREFIX.$index.1"

    # setsid: the sandbox must not share the caller's session, so a Ctrl-C or
    # the end of the ansible task does not reach it.
    setsid ip netns exec "$ns" unshare --pid --fork --mount --uts --ipc \
        --mount-proc="$root/proc" chroot "$root" /usr/bin/env container=other \
        /lib/systemd/systemd --system --log-target=console \
        </dev/null >"$dir/console.log" 2>&1 &
    echo $! >"$dir/pid"

    local address=$SUBNET_PREFIX.$index.2 i
    for i in $(seq 1 120); do
        if ssh -q -i "$STATE_DIR/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no \
            -o UserKnownHostsFile=/dev/null -o ConnectTimeout=1 "root@$address" \
            'systemctl is-system-running --wait >/dev/null 2>&1; true' </dev/null; then
            log "$name is up at $address (pid $(cat "$dir/pid"))"
            printf '%s\n' "$address"
            return 0
        fi
        kill -0 "$(cat "$dir/pid")" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 30 "$dir/console.log" >&2 || true
    die "$name did not answer on ssh at $address"
}

# Children of a pid, from the kernel's own list (no name matching).
children() { cat /proc/"$1"/task/*/children 2>/dev/null || true; }

destroy() {
    local name=$1 dir=$STATE_DIR/$1
    local root=$dir/root pid="" init="" i
    [[ -d $dir ]] || return 0
    [[ -f $dir/pid ]] && pid=$(cat "$dir/pid")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        # pid is `ip netns exec`, which execs unshare; its child is the
        # sandbox's PID 1 (systemd). SIGRTMIN+4 asks systemd to power off.
        for init in $(children "$pid"); do
            kill -s RTMIN+4 "$init" 2>/dev/null || true
        done
        for i in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        # PID 1 of a pid namespace takes every process of the sandbox with it.
        for init in $(children "$pid"); do kill -KILL "$init" 2>/dev/null || true; done
        kill -KILL "$pid" 2>/dev/null || true
        for i in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
    fi
    # Mounts are private to the sandbox's mount namespace; unmount anything a
    # caller may have bind-mounted from outside all the same, deepest first.
    if [[ -d $root ]]; then
        awk -v r="$root" '$5 == r || index($5, r "/") == 1 {print $5}' /proc/self/mountinfo |
            sort -r | while read -r m; do umount -l "$m" || true; done
    fi
    local ns veth
    ns=$(cat "$dir/netns" 2>/dev/null || true)
    veth=$(cat "$dir/veth" 2>/dev/null || true)
    [[ -n $ns ]] && ip netns del "$ns" 2>/dev/null || true
    [[ -n $veth ]] && ip link del "$veth" 2>/dev/null || true
    rm -rf --one-file-system "$dir"
    log "$name destroyed"
}

assert_clean() {
    local name=$1 dir=$STATE_DIR/$1 bad=0 ns p
    ns=$(netns_name "$name")
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
        log "left behind: network namespace $ns"
        bad=1
    fi
    if [[ -e $dir ]]; then
        log "left behind: $dir"
        bad=1
    fi
    if grep -qF " $dir" /proc/self/mountinfo; then
        log "left behind: mounts under $dir"
        bad=1
    fi
    for p in /proc/[0-9]*; do
        if [[ $(readlink "$p/root" 2>/dev/null) == "$dir/root"* ]]; then
            log "left behind: process ${p#/proc/} rooted in $dir/root"
            bad=1
        fi
    done
    ((bad == 0)) || die "$name was not cleaned up"
    log "$name: nothing left behind"
}

assert_link_gone() {
    local index=$1 veth
    veth=$(veth_name "$index")
    if ip link show "$veth" >/dev/null 2>&1; then
        die "left behind: link $veth"
    fi
}

[[ $(id -u) == 0 ]] || die "sandbox hosts need root (network namespaces, chroot)"
case ${1:-} in
    create) create "$2" "$3" ;;
    destroy) destroy "$2" ;;
    assert-clean)
        assert_clean "$2"
        [[ -n ${3:-} ]] && assert_link_gone "$3"
        ;;
    rootfs) build_rootfs && echo "$TARBALL" ;;
    *) die "usage: $0 create NAME INDEX | destroy NAME | assert-clean NAME [INDEX] | rootfs" ;;
esac
