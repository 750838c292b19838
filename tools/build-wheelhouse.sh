#!/usr/bin/env bash
# Build the wheelhouse a fleet installs the appliance from (roles/appliance, native method).
#
#   tools/build-wheelhouse.sh OUT VERSION [PYTHON_VERSION] [PLATFORM...]
#   tools/build-wheelhouse.sh --deps      (print the runtime dependencies it would download)
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

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEPS_ONLY=
if [[ ${1:-} == --deps ]]; then
    DEPS_ONLY=1
    set -- - 0
fi
[[ $# -ge 2 ]] || { echo "usage: $0 OUT VERSION [PYTHON_VERSION] [PLATFORM...] | $0 --deps" >&2; exit 2; }
OUT=$1
VERSION=$2
shift 2
PYVER=${1:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
[[ $# -gt 0 ]] && shift
if [[ $# -gt 0 ]]; then
    PLATFORMS=("$@")
else
    arch=$(uname -m)
    PLATFORMS=("manylinux_2_28_$arch" "manylinux_2_17_$arch" "manylinux2014_$arch" "linux_$arch")
fi
[[ $VERSION =~ ^[0-9]+(\.[0-9]+)*([a-z0-9.+-]*)$ ]] || { echo "bad version: $VERSION" >&2; exit 2; }

# The runtime dependencies, read from pyproject.toml (never the dev or Jetson extras). The
# controller may run Python 3.10 (JetPack 6.2's own, or Ubuntu 22.04's), which has no tomllib:
# tomli (the same parser, pip install tomli) when it is there, else the `dependencies` array
# alone, which this project writes as one string per line (comments allowed).
DEPS=$("$PYTHON" - "$REPO/pyproject.toml" <<'PY'
import ast, re, sys
path = sys.argv[1]
try:
    import tomllib
except ModuleNotFoundError:
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None
if tomllib is not None:
    with open(path, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
else:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    project = re.search(r"^\[project\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    array = project and re.search(r"^dependencies\s*=\s*\[(.*?)^\]", project.group(1), re.M | re.S)
    if not array:
        sys.exit(f"{path}: no [project] dependencies array (install tomli: pip install tomli)")
    lines = [ln for ln in array.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    try:
        deps = ast.literal_eval("[" + "\n".join(lines) + "]")
    except (SyntaxError, ValueError) as exc:
        sys.exit(f"{path}: cannot read the dependencies array without tomli ({exc}): pip install tomli")
    if not all(isinstance(d, str) for d in deps):
        sys.exit(f"{path}: dependencies must be strings")
print("\n".join(deps))
PY
)
if [[ -n $DEPS_ONLY ]]; then
    printf '%s\n' "$DEPS"
    exit 0
fi
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
