#!/bin/sh
# iptables as on JetPack 6.2's L4T kernel, which is built without CONFIG_IP_NF_RAW (JETSON.md,
# "Jetson Linux has no iptable_raw.ko", moby issue 49557): every use of the raw table fails
# with iptables' own message and exit status 3; everything else goes to the real iptables.
prev=
for arg in "$@"; do
    case "$prev $arg" in
    "-t raw" | "--table raw" | *" -traw" | *" --table=raw")
        echo "iptables v1.8.7 (legacy): can't initialize iptables table \`raw': Table does not exist (do you need to insmod?)" >&2
        echo "Perhaps iptables or your kernel needs to be upgraded." >&2
        exit 3
        ;;
    esac
    prev=$arg
done
exec /usr/sbin/iptables "$@"
