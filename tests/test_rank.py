"""tflaunch.remote.rank: who a rank is (per launcher's variables), the output frames and their demux."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

from tflaunch.remote import rank
from tflaunch.launch.demux import Demux
from tflaunch.remote.rank import FRAME_MAX, frames, identity


@pytest.mark.parametrize("env,expected", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_NODE_RANK": "1", "TFLAUNCH_PROCS_PER_NODE": "2"},
     {"launcher": "openmpi", "rank": 3, "world_size": 4, "local_rank": 1, "node_rank": 1}),
    ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "TFLAUNCH_PROCS_PER_NODE": "4"},
     {"launcher": "pmi", "rank": 5, "world_size": 8, "local_rank": 1, "node_rank": 1}),
    # srun --mpi=pmi2: no MPI_LOCALRANKID; tflaunch's plan fills it in
    ({"PMI_RANK": "5", "PMI_SIZE": "8", "SLURM_LOCALID": "9", "TFLAUNCH_PROCS_PER_NODE": "4"},
     {"launcher": "pmi", "rank": 5, "world_size": 8, "local_rank": 1, "node_rank": 1}),
    ({"PMIX_RANK": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"},
     {"launcher": "pmix", "rank": 2, "world_size": 4, "local_rank": 0, "node_rank": 1}),
    # mpirun inside an allocation: the ranks inherit the daemon step's SLURM_PROCID=0; MPI's variables win
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     {"launcher": "openmpi", "rank": 1, "world_size": 2, "local_rank": 1, "node_rank": None}),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_NODEID": "1"},
     {"launcher": "slurm", "rank": 7, "world_size": 8, "local_rank": 3, "node_rank": 1}),
])
def test_identity(env, expected):
    assert identity(env) == expected


def test_identity_none_outside_a_launcher():
    assert identity({"PATH": "/bin"}) is None


def test_frames_round_trip_random_output():
    rng = random.Random(7)
    sent: dict[tuple[int, int], bytes] = {}
    mixed: list[tuple[int, bytes]] = []
    for _ in range(300):  # ranks' frames interleave as mpirun forwards them; each frame stays whole
        r, fd = rng.randrange(4), rng.choice((1, 2))
        data = bytes(rng.choice(b"ab\n\r\x1e\x1f\x00") for _ in range(rng.choice((0, 1, 10, 5000, 9000))))
        sent[(r, fd)] = sent.get((r, fd), b"") + data
        chunks, rest = frames(r, data, final=True)
        assert rest == b""
        assert all(len(c) <= FRAME_MAX and c.endswith(b"\n") and c.count(b"\n") == 1 for c in chunks)
        mixed += [(fd, c) for c in chunks]
    got: dict[tuple[int, int], bytes] = {}
    other: list[bytes] = []
    demux = Demux(lambda r, fd, d: got.__setitem__((r, fd), got.get((r, fd), b"") + d),
                  lambda fd, d: other.append(d), lambda *a: None)
    for fd, chunk in mixed:
        for piece in (chunk[:3], chunk[3:]):  # reads split anywhere
            demux.feed(fd, piece)
    demux.close()
    assert other == []
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in sent.items() if v}


def test_demux_resynchronises_after_a_cut_frame():
    """A reader upstream (an MPI daemon) cut rank 1's frame; rank 2's frame follows on the same line."""
    got, other = [], []
    demux = Demux(lambda r, fd, d: got.append((r, d)), lambda fd, d: other.append(d), lambda *a: None)
    cut = frames(1, b"a long line of rank 1\n")[0][0][:8]
    demux.feed(1, cut + frames(2, b"whole \x1e line\n")[0][0] + frames(3, b"next\n")[0][0])
    assert got == [(2, b"whole \x1e line\n"), (3, b"next\n")]
    assert other == [cut + b"\n"]


def test_demux_keeps_mpiruns_own_lines_and_reports_events():
    got, other, events = [], [], []
    demux = Demux(lambda *a: got.append(a), lambda fd, d: other.append((fd, d)), lambda *a: events.append(a))
    demux.feed(2, b"mpirun noticed that process rank 1 exited\n" + rank.control(1, b"x", "3") +
               rank.control(0, b"s", "123 node1") + b"\x1enot a frame\n")
    assert other == [(2, b"mpirun noticed that process rank 1 exited\n"), (2, b"\x1enot a frame\n")]
    assert events == [(1, "x", "3"), (0, "s", "123 node1")]


def _wrapper(tmp_path, env, *argv, preexec_fn=None):
    """Run rank.py as mpirun would, with the launcher's variables in ``env``."""
    host = os.uname().nodename
    (tmp_path / f"cwd.{host}").write_text(str(tmp_path))
    script = tmp_path / "rank.py"
    script.write_text(open(rank.__file__).read())
    return subprocess.run([sys.executable, "-I", "-S", str(script), *argv], capture_output=True,
                          env={"PATH": os.environ["PATH"], **env}, cwd="/", timeout=30, preexec_fn=preexec_fn)


def test_wrapper_sets_variables_moves_to_cwd_and_passes_exit_code(tmp_path):
    code = ("import os,sys;print(os.environ['TFLAUNCH_RANK'],os.environ['TFLAUNCH_LOCAL_RANK'],"
            "os.environ['TFLAUNCH_NODE_RANK'],os.environ['TFLAUNCH_WORLD_SIZE'],os.getcwd());"
            "print('e',file=sys.stderr);sys.exit(4)")
    result = _wrapper(tmp_path, {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1",
                                 "TFLAUNCH_PROCS_PER_NODE": "2"}, sys.executable, "-c", code)
    assert result.returncode == 4
    assert result.stdout == b"\x1e3\x1fl3 1 1 4 " + str(tmp_path).encode() + b"\n"
    assert result.stderr.startswith(b"\x1e3\x1fs")
    assert result.stderr.endswith(b"\x1e3\x1fle\n\x1e3\x1fx4\n")


def test_a_stop_that_comes_before_the_wrapper_forwards_is_forwarded_to_the_program(tmp_path):
    """mpirun's SIGTERM can reach the wrapper before it has installed its forwarding (a rank stopped at
    once because another failed): it must stop the program then, not kill the wrapper and orphan the
    program, nor be lost. Here the wrapper starts with a SIGTERM already pending (blocked across exec)."""
    def term_pending():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)

    result = _wrapper(tmp_path, {"OMPI_COMM_WORLD_RANK": "0"}, sys.executable, "-c",
                      "import time; print('up', flush=True); time.sleep(20)", preexec_fn=term_pending)
    # stopped by the forwarded SIGTERM (-15), not run to its end (0)
    assert result.returncode == 128 + signal.SIGTERM and result.stderr.endswith(b"\x1e0\x1fx-15\n"), result


def test_wrapper_outside_mpirun_is_a_clear_error(tmp_path):
    result = _wrapper(tmp_path, {}, "true")
    assert result.returncode == 127
    assert b"not started by mpirun or srun" in result.stderr and b"Traceback" not in result.stderr


def test_wrapper_reports_a_program_that_cannot_start(tmp_path):
    result = _wrapper(tmp_path, {"OMPI_COMM_WORLD_RANK": "0"}, "/nonexistent/python")
    assert result.returncode == 127
    assert b"cannot start /nonexistent/python" in result.stderr and result.stderr.endswith(b"\x1e0\x1fx127\n")


def test_rank_info_for_scripts():
    from tflaunch import rank_info

    assert rank_info({"TFLAUNCH_RANK": "3", "TFLAUNCH_LOCAL_RANK": "1", "TFLAUNCH_NODE_RANK": "1",
                      "TFLAUNCH_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}) == \
        {"launcher": "tflaunch", "rank": 3, "local_rank": 1, "node_rank": 1, "world_size": 4}
    assert rank_info({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"})["rank"] == 2  # raw mpiexec
    assert rank_info({}) == {"launcher": None, "rank": 0, "local_rank": 0, "node_rank": 0, "world_size": 1}
