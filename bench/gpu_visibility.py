"""Check ``--gpu`` / ``CUDA_VISIBLE_DEVICES`` handling on a real GPU machine (not a benchmark: a check).

Runs small jobs through tflaunch and has every process report what CUDA itself sees (PyTorch or JAX,
whichever is installed; nvidia-smi's view of the process otherwise)::

    python bench/gpu_visibility.py            # prints one JSON line per case and "ok" or the failures

Cases: without ``--gpu`` a process sees no GPU; with ``--gpu`` each of N processes gets its own share;
more processes than GPUs is refused, or shared with ``--gpus-shared``; a pre-set CUDA_VISIBLE_DEVICES
(as Slurm sets it) is subdivided, never widened.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r'''
import json, os
seen = None
try:
    import torch
    seen = torch.cuda.device_count()
    names = [torch.cuda.get_device_properties(i).uuid.hex[:8] if hasattr(torch.cuda.get_device_properties(i), "uuid") else str(i) for i in range(seen)]
except ImportError:
    try:
        import jax
        names = [str(d) for d in jax.devices() if d.platform == "gpu"]
        seen = len(names)
    except ImportError:
        names = []
print("PROBE " + json.dumps({"rank": os.environ.get("TFLAUNCH_RANK"), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "seen": seen, "names": names}), flush=True)
'''


def gpu_count() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def run(src: str, home: str, *args: str, env: dict | None = None) -> tuple[int, list[dict], str]:
    environ = dict(os.environ, TFLAUNCH_HOME=home, PYTHONPATH=REPO)
    environ.pop("CUDA_VISIBLE_DEVICES", None)
    environ.update(env or {})
    result = subprocess.run([sys.executable, "-m", "tflaunch", "run", "--source-dir", src, *args, "probe.py"],
                            env=environ, capture_output=True, text=True, timeout=300)
    probes = [json.loads(line.split("PROBE ", 1)[1]) for line in result.stdout.splitlines() if "PROBE " in line]
    return result.returncode, sorted(probes, key=lambda p: int(p["rank"])), result.stderr.strip().splitlines()[-1:]


def main() -> int:
    gpus = gpu_count()
    print(json.dumps({"gpus": gpus}))
    if gpus == 0:
        print("no GPU here: nothing to check")
        return 0
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        src, home = os.path.join(tmp, "src"), os.path.join(tmp, "home")
        os.makedirs(src)
        with open(os.path.join(src, "probe.py"), "w") as fh:
            fh.write(PROBE)

        def case(name, expect_rc, check, *args, env=None):
            rc, probes, err = run(src, home, *args, env=env)
            ok = rc == expect_rc and check(probes)
            print(json.dumps({"case": name, "rc": rc, "ok": ok, "probes": probes, "stderr": err}))
            if not ok:
                failures.append(name)

        case("no --gpu: no GPU visible", 0, lambda p: len(p) == 1 and p[0]["seen"] == 0 and p[0]["cvd"] == "")
        case("--gpu, 1 process: every GPU", 0, lambda p: p[0]["seen"] == gpus, "--gpu")
        case(f"--gpu, {gpus} processes: one each", 0,
             lambda p: [x["seen"] for x in p] == [1] * gpus and len({x["cvd"] for x in p}) == gpus,
             "--gpu", "--procs-per-node", str(gpus))
        case(f"--gpu, {gpus + 1} processes: refused", 2, lambda p: p == [],
             "--gpu", "--procs-per-node", str(gpus + 1))
        case(f"--gpu --gpus-shared, {gpus + 1} processes", 0,
             lambda p: all(x["seen"] == 1 for x in p) and len(p) == gpus + 1,
             "--gpu", "--gpus-shared", "--procs-per-node", str(gpus + 1))
        case("CUDA_VISIBLE_DEVICES=0 preset, --gpus-per-node 2: never widened", 2, lambda p: p == [],
             "--gpu", "--gpus-per-node", str(2), env={"CUDA_VISIBLE_DEVICES": "0"})
        case("CUDA_VISIBLE_DEVICES=0 preset: subdivided", 0, lambda p: p[0]["cvd"] == "0" and p[0]["seen"] == 1,
             "--gpu", env={"CUDA_VISIBLE_DEVICES": "0"})
        case("--backend ps --gpu: ps gets none", 0,
             lambda p: [x["cvd"] == "" for x in p] == [False, True] and p[1]["seen"] == 0,
             "--backend", "ps", "--workers", "1", "--ps", "1", "--gpu")
    print("ok" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
