#!/usr/bin/env bash
# Installs the one libtorch ivado builds against (PyTorch 2.13.0 from PyPI, the version tch 0.26 requires)
# into a venv cached outside the clone, and points the repo's `.libtorch` link at it.
# Idempotent: a second run only re-checks the version and the link.
set -euo pipefail

TORCH_VERSION="2.13.0"
CACHE_DIR="${IVADO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ivado}"
VENV="$CACHE_DIR/torch-$TORCH_VERSION"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

find_python() {
    for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
    echo "error: no python3 found; install Python 3.10+ (e.g. apt-get install python3 python3-venv)" >&2
    exit 1
}

torch_dir() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.util, os
spec = importlib.util.find_spec("torch")
print(os.path.dirname(spec.origin) if spec else "")
PY
}

installed_version() {
    local dir="$1"
    [ -f "$dir/version.py" ] || return 0
    sed -n "s/^__version__ = '\([^'+]*\).*'/\1/p" "$dir/version.py"
}

mkdir -p "$CACHE_DIR"
if [ ! -x "$VENV/bin/python" ]; then
    echo "ivado: creating venv $VENV"
    "$(find_python)" -m venv "$VENV"
fi

dir="$(torch_dir || true)"
if [ -z "$dir" ] || [ "$(installed_version "$dir")" != "$TORCH_VERSION" ]; then
    echo "ivado: installing torch==$TORCH_VERSION into $VENV (one time, several GB)"
    "$VENV/bin/pip" install --disable-pip-version-check --progress-bar off "torch==$TORCH_VERSION"
    dir="$(torch_dir)"
fi

got="$(installed_version "$dir")"
if [ "$got" != "$TORCH_VERSION" ]; then
    echo "error: $dir/version.py says torch $got, but tch 0.26 needs exactly $TORCH_VERSION" >&2
    exit 1
fi
if [ ! -f "$dir/lib/libtorch_cpu.so" ]; then
    echo "error: $dir/lib/libtorch_cpu.so is missing; remove $VENV and rerun" >&2
    exit 1
fi

ln -sfn "$dir" "$REPO_ROOT/.libtorch"
echo "ivado: libtorch $TORCH_VERSION at $dir"
