#!/usr/bin/env bash
# Build the wheelhouse a fleet installs the appliance from (roles/appliance, native method).
#
#   tools/build-wheelhouse.sh OUT VERSION [PYTHON_VERSION] [PLATFORM...]
#
# OUT gets the appliance wheel (built from this checkout with VERSION as its version), every
# dependency as a binary wheel for the target's Python and platform, and requirements.txt
# pinning each wheel by name, version and sha256 (the role installs with
# `pip install --no-index --require-hashes`). Devices never reach an index: only the controller
# runs this, with pip's own configuration (PIP_INDEX_URL, PIP_FIND_LINKS, a local mirror...).
#
# Defaults: the controller's Python version and platform (right for the sandbox hosts). A
# Jetson AGX Orin on JetPack 6.2 needs: 3.10 manylinux2014_aarch64 manylinux_2_28_aarch64.
#
# The dependency wheels are cached under APPLIANCE_WHEELHOUSE_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/appliance-wheelhouse), keyed by the dependency list of
# pyproject.toml, the Python version and the platforms: a new appliance version reuses them.
set -euo pipefail

[[ $# -ge 2 ]] || { echo "usage: $0 OUT VERSION [PYTHON_VERSION] [PLATFORM...]" >&2; exit 2; }
OUT=$1
VERSION=$2
shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
PYVER=${1:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
[[ $# -gt 0 ]] && shift
if [[ $# -gt 0 ]]; then
    PLATFORMS=("$@")
else
    arch=$(uname -m)
    PLATFORMS=("manylinux_2_28_$arch" "manylinux_2_17_$arch" "manylinux2014_$arch" "linux_$arch")
fi
[[ $VERSION =~ ^[0-9]+(\.[0-9]+)*([a-z0-9.+-]*)$ ]] || { echo "bad version: $VERSION" >&2; exit 2; }

# The runtime dependencies, read from pyproject.toml (never the dev or Jetson extras).
DEPS=$("$PYTHON" - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
)
CACHE=${APPLIANCE_WHEELHOUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance-wheelhouse}
KEY=$(printf '%s\n%s\n%s\n' "$DEPS" "$PYVER" "${PLATFORMS[*]}" | sha256sum | cut -c1-12)
DEPDIR=$CACHE/deps-$KEY
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [[ ! -f $DEPDIR/.complete ]]; then
    rm -rf "$DEPDIR"
    mkdir -p "$DEPDIR"
    platform_args=()
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    mapfile -t dep_lines <<<"$DEPS"
    echo "wheelhouse: downloading dependency wheels for Python $PYVER ${PLATFORMS[0]} (cached as $DEPDIR)" >&2
    # PyTurboJPEG 1.x, the line that works with JetPack 6.2's libjpeg-turbo 2.1 (JETSON.md), is
    # published as an sdist only. It is pure Python (ctypes), so a wheel built here fits every
    # target; the download below then finds it in DEPDIR.
    mapfile -t sdist_only < <(printf '%s\n' "${dep_lines[@]}" | grep -i '^pyturbojpeg' || true)
    if [[ ${#sdist_only[@]} -gt 0 ]]; then
        "$PYTHON" -m pip wheel -q --no-deps -w "$DEPDIR" "${sdist_only[@]}" >&2
    fi
    "$PYTHON" -m pip download -q -d "$DEPDIR" --find-links "$DEPDIR" --only-binary :all: \
        --python-version "$PYVER" "${platform_args[@]}" "${dep_lines[@]}" pip
    touch "$DEPDIR/.complete"
fi
flock -u 9

rm -rf "$OUT"
mkdir -p "$OUT"
# The appliance wheel carries VERSION: build it from a copy of the sources with the version set.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/appliance" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
sed -i -E "s/^version = \".*\"/version = \"$VERSION\"/" "$src/pyproject.toml"
sed -i -E "s/^__version__ = \".*\"/__version__ = \"$VERSION\"/" "$src/appliance/__init__.py"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$src" >&2
cp -l "$DEPDIR"/*.whl "$OUT/" 2>/dev/null || cp "$DEPDIR"/*.whl "$OUT/"

# requirements.txt: every wheel but pip itself (pip runs from its wheel), pinned with its hash.
"$PYTHON" - "$OUT" <<'PY'
import hashlib, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
lines = []
for wheel in sorted(out.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if name.lower() == "pip":
        continue
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lines.append(f"{re.sub(r'[-_.]+', '-', name).lower()}=={version} --hash=sha256:{digest}")
(out / "requirements.txt").write_text("\n".join(lines) + "\n")
PY
echo "$OUT"
