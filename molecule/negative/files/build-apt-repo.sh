#!/bin/bash
# Builds, on the controller, two signed apt repositories that stand for Docker's and NVIDIA's
# (container_runtime's sources): OUT/repo/docker in the dists/ layout of download.docker.com,
# OUT/repo/nvidia/amd64 flat like nvidia.github.io/libnvidia-container/stable/deb/$(ARCH), each
# package an empty stand-in under its real name; docker-ce brings a docker.service. Signed with
# a throwaway key (OUT/sandbox-repo.asc), so apt checks them as it checks the real ones.
#   build-apt-repo.sh OUT SUITE
set -euo pipefail
OUT=$1
SUITE=$2
rm -rf "$OUT"
mkdir -p "$OUT/repo/docker/pool" "$OUT/repo/docker/dists/$SUITE/stable/binary-amd64" "$OUT/repo/nvidia/amd64"
export GNUPGHOME=$OUT/gnupg
mkdir -m 700 "$GNUPGHOME"
gpg --batch --quiet --pinentry-mode loopback --passphrase '' \
    --quick-gen-key 'appliance sandbox repository <root@localhost>' ed25519 sign never
gpg --batch --armor --export >"$OUT/sandbox-repo.asc"

deb() {  # name version dest-dir [with-unit]
    local d
    d=$(mktemp -d)
    mkdir "$d/DEBIAN"
    printf 'Package: %s\nVersion: %s\nArchitecture: all\nMaintainer: sandbox <root@localhost>\nDescription: stand-in for %s\n' \
        "$1" "$2" "$1" >"$d/DEBIAN/control"
    if [[ ${4:-} == with-unit ]]; then
        mkdir -p "$d/lib/systemd/system"
        printf '[Unit]\nDescription=Docker stand-in (sandbox)\n[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n' \
            >"$d/lib/systemd/system/docker.service"
    fi
    dpkg-deb --root-owner-group --build "$d" "$3/$1_$(echo "$2" | tr ':' '%')_all.deb" >/dev/null
    rm -rf "$d"
}
v='5:28.0.4-1~debian.12~bookworm'
deb docker-ce "$v" "$OUT/repo/docker/pool" with-unit
for p in docker-ce-cli docker-buildx-plugin docker-compose-plugin; do deb "$p" "$v" "$OUT/repo/docker/pool"; done
deb containerd.io 1.7.27-1 "$OUT/repo/docker/pool"
deb nvidia-container-toolkit 1.17.8-1 "$OUT/repo/nvidia/amd64"

sign() {  # directory with Release
    gpg --batch --yes --quiet --pinentry-mode loopback --passphrase '' --clearsign -o "$1/InRelease" "$1/Release"
}
(cd "$OUT/repo/docker" && dpkg-scanpackages --multiversion pool /dev/null 2>/dev/null >"dists/$SUITE/stable/binary-amd64/Packages")
(cd "$OUT/repo/docker/dists/$SUITE" && {
    printf 'Origin: sandbox\nSuite: %s\nCodename: %s\nComponents: stable\nArchitectures: amd64\nDate: %s\nSHA256:\n' \
        "$SUITE" "$SUITE" "$(date -Ru)"
    printf ' %s %s stable/binary-amd64/Packages\n' "$(sha256sum <stable/binary-amd64/Packages | cut -d' ' -f1)" \
        "$(stat -c %s stable/binary-amd64/Packages)"
} >Release)
sign "$OUT/repo/docker/dists/$SUITE"
(cd "$OUT/repo/nvidia/amd64" && dpkg-scanpackages . /dev/null 2>/dev/null >Packages && {
    printf 'Origin: sandbox\nDate: %s\nSHA256:\n' "$(date -Ru)"
    printf ' %s %s Packages\n' "$(sha256sum <Packages | cut -d' ' -f1)" "$(stat -c %s Packages)"
} >Release)
sign "$OUT/repo/nvidia/amd64"
rm -rf "$GNUPGHOME"
