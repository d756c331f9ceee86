#!/usr/bin/env bash
# Installs ivadomed (the PyTorch reference that ivado is measured against) into a venv cached outside the
# clone, reusing the torch 2.13.0 that scripts/setup-libtorch.sh already installed instead of downloading
# torch again. Idempotent: a second run only re-checks that `import ivadomed` works.
#
# ivadomed 2.9.10 (the last release) declares Python <3.11 and pins nothing that torch 2.13 breaks for the code
# paths benchmarked here; the torch venv is Python 3.11, so ivadomed is installed with --no-deps and its runtime
# dependencies are listed below at versions that have Python 3.11 wheels and satisfy ivadomed's ranges.
set -euo pipefail

IVADOMED_VERSION="2.9.10"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0" # the torchvision release built against torch 2.13.0
CACHE_DIR="${IVADO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ivado}"
TORCH_VENV="$CACHE_DIR/torch-$TORCH_VERSION"
VENV="$CACHE_DIR/ivadomed-venv"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [ ! -x "$TORCH_VENV/bin/python" ]; then
    echo "ivadomed setup: $TORCH_VENV missing; running scripts/setup-libtorch.sh first"
    bash "$REPO_ROOT/scripts/setup-libtorch.sh"
fi

if [ ! -x "$VENV/bin/python" ]; then
    # Same interpreter as the torch venv, so the torch wheel's compiled modules load.
    base_python="$(sed -n 's/^executable = //p' "$TORCH_VENV/pyvenv.cfg")"
    echo "ivadomed setup: creating $VENV with $base_python"
    "$base_python" -m venv "$VENV"
fi

# The torch venv's site-packages joins this venv's path through a .pth file (a venv's
# --system-site-packages only reaches the base interpreter's packages, not another venv's).
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
torch_site="$("$TORCH_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$torch_site" >"$site/ivado-torch.pth"

if "$VENV/bin/python" -c "import ivadomed.inference, ivadomed.loader.loader" >/dev/null 2>&1; then
    echo "ivadomed setup: $VENV ready (ivadomed $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("ivadomed"))'))"
    exit 0
fi

pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# numpy < 2: pandas < 2.0 (ivadomed's pin) is compiled against numpy 1.x.
"${pip[@]}" "numpy<2" "pandas>=1.5,<2.0" scipy "scikit-image~=0.22" "scikit-learn" "nibabel~=5.2" \
    "loguru~=0.5" "joblib~=1.0" "imageio>=2.31.4" "matplotlib>=3.3.0" "tqdm>=4.30" "csv-diff>=1.0" \
    "pybids>=0.14.0,<0.15.6" "onnxruntime>=1.7.0,!=1.16.0" onnx wandb "tensorboard>=1.15.0"
# torch-dependent packages without their dependencies, so pip does not replace the shared torch.
"${pip[@]}" --no-deps "torchvision==$TORCHVISION_VERSION"
# Python 3.11 is outside ivadomed's declared range (<3.11) only by its metadata; nothing used here needs <3.11.
"${pip[@]}" --no-deps --ignore-requires-python "ivadomed==$IVADOMED_VERSION"
"${pip[@]}" --no-deps "torchio>=0.18.68,<0.21"
# torchio's own runtime dependencies (torch excluded).
"${pip[@]}" deprecated einops simpleitk humanize rich typer
"$VENV/bin/python" -c "import ivadomed.inference, ivadomed.loader.loader; print('ivadomed setup: import ok')"
