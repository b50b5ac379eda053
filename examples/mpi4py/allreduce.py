"""A small mpi4py program: every rank contributes (rank + 1) ** 2, an allreduce sums them, and each
rank checks the sum against the closed form  S (S + 1) (2 S + 1) / 6  for world size S.

    mpirun -n 4 python allreduce.py            # Open MPI as root: add --allow-run-as-root
    tflaunch ... -- python allreduce.py        # under tflaunch's MPI backend

Each rank prints one line ``rank R/S on HOST: allreduce ok SUM``.  Rank 0 writes
``./outputs/result.json``::

    {"world_size": S, "sum": SUM, "ranks_env": [{"mpi_rank": 0, "mpi_local_rank": 0, "host": ...,
      "TFLAUNCH_RANK": "0", "TFLAUNCH_LOCAL_RANK": "0", "TFLAUNCH_WORLD_SIZE": "4"}, ...]}

``ranks_env`` has one entry per rank, in MPI rank order, with the TFLAUNCH_* variables as that rank
saw them (null when unset), so a test can compare them with MPI's own rank, local rank and size.

Exit status: 0 if the check passed, 1 if it did not.  For fault and kill tests:
    --fail-rank R --exit-code N   rank R exits with status N right after MPI init (no finalize,
                                  like a crash); the other ranks go on and block in the allreduce
    --sleep S                     every rank (but a failing one) sleeps S seconds before the allreduce
"""
import argparse
import json
import os
import socket
import sys
import time

from mpi4py import MPI

ENV_KEYS = ("TFLAUNCH_RANK", "TFLAUNCH_LOCAL_RANK", "TFLAUNCH_WORLD_SIZE")


def say(line):
    """One line in one write, so that the launcher's output forwarding does not split it."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fail-rank", type=int, default=None, help="this rank exits right after MPI init")
    p.add_argument("--exit-code", type=int, default=3, help="exit status of --fail-rank (default 3)")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep before the allreduce")
    p.add_argument("--output", default=os.path.join("outputs", "result.json"),
                   help="where rank 0 writes the result (default ./outputs/result.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()

    if args.fail_rank is not None and rank == args.fail_rank:
        print(f"rank {rank}/{size} on {host}: exiting with code {args.exit_code} (--fail-rank)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(args.exit_code)        # a crash: no MPI_Finalize, which would wait for the others

    if args.sleep > 0:
        time.sleep(args.sleep)

    # The ranks on this node, in MPI's own numbering.
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()

    total = comm.allreduce((rank + 1) ** 2, op=MPI.SUM)
    expected = size * (size + 1) * (2 * size + 1) // 6
    ok = total == expected
    if ok:
        say(f"rank {rank}/{size} on {host}: allreduce ok {total}")
    else:
        say(f"rank {rank}/{size} on {host}: allreduce FAILED: got {total}, expected {expected}")

    mine = {"mpi_rank": rank, "mpi_local_rank": local_rank, "host": host}
    mine.update({key: os.environ.get(key) for key in ENV_KEYS})
    ranks_env = comm.gather(mine, root=0)
    if rank == 0:
        result = {"world_size": size, "sum": total, "expected": expected, "ok": ok,
                  "ranks_env": ranks_env}
        out_dir = os.path.dirname(args.output)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.output)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
