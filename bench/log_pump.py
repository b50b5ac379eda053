"""Log pump: 8 processes each writing MB megabytes of text lines to stdout (default 200).

Throughput of the whole job (bytes written / wall time) through tflaunch vs the same 8 writers piped
to `cat > file` in parallel (goal: >= 0.8x), and the launcher's peak RSS (VmHWM; goal < 60 MB).
tflaunch runs attached (streaming every line with its [rank N] prefix) with its console going to
/dev/null and, as a second variant, to a file. Each process's output also lands in its log file in
the run record. --ssh adds a variant over two ssh hosts (network namespaces, needs root), where the
output is relayed through the agents' connections.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from _util import env_with, netns_hosts, scratch

WRITER = """\
import os, sys
total = int(sys.argv[1]) << 20
line = ("%d " % int(os.environ.get("TFLAUNCH_RANK", 0))).encode() + b"x" * 90 + b"\\n"
chunk = line * (65536 // len(line))
written = 0
while written < total:
    written += os.write(1, chunk[:total - written])
"""


def peak_rss(pid: int, result: list) -> None:
    """Poll VmHWM of ``pid`` until it exits; keep the last value (kB)."""
    while True:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        result[0] = int(line.split()[1])
        except OSError:
            return
        time.sleep(0.05)


def run_tflaunch(argv: list[str], env: dict, console: str) -> tuple[float, float]:
    with open(console, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.DEVNULL)
        rss = [0]
        watcher = threading.Thread(target=peak_rss, args=(proc.pid, rss), daemon=True)
        watcher.start()
        code = proc.wait()
        took = time.perf_counter() - start
    watcher.join()
    if code != 0:
        raise RuntimeError(f"tflaunch exited {code}")
    return took, rss[0] / 1024


def run_cat(writer: str, mb: int, out_dir: str) -> float:
    script = " & ".join(f"{sys.executable} {writer} {mb} | cat > {out_dir}/cat-{i}.log" for i in range(8)) + " & wait"
    start = time.perf_counter()
    subprocess.run(["sh", "-c", script], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ssh", action="store_true")
    args = parser.parse_args()
    work = scratch("log-pump")
    src = work / "src"
    src.mkdir()
    (src / "writer.py").write_text(WRITER)
    out_dir = str(work / "cat")
    os.mkdir(out_dir)
    env = env_with(TFLAUNCH_HOME=str(work / "home"))
    tfl = [sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src)]
    variants = {"tflaunch, console -> /dev/null": (tfl + ["--procs-per-node", "8", "writer.py", str(args.mb)], os.devnull),
                "tflaunch, console -> file": (tfl + ["--procs-per-node", "8", "writer.py", str(args.mb)],
                                              str(work / "console.log"))}
    with netns_hosts(args.ssh) as hosts:
        if hosts is not None:
            variants["tflaunch over ssh (relayed), -> /dev/null"] = (
                tfl + ["--ssh-config", hosts.config, "--hosts", "h1:4,h2:4", "writer.py", str(args.mb)], os.devnull)
        measure(variants, str(src / "writer.py"), out_dir, str(work / "home"), env, args.mb, args.repeat)


def measure(variants: dict, writer: str, out_dir: str, home: str, env: dict, mb: int, repeat: int) -> None:
    cat, results = [], {name: ([], []) for name in variants}
    for _ in range(repeat):
        cat.append(run_cat(writer, mb, out_dir))
        for name, (argv, console) in variants.items():
            took, rss = run_tflaunch(argv, env, console)
            results[name][0].append(took)
            results[name][1].append(rss)
            shutil.rmtree(home, ignore_errors=True)
    base = statistics.median(cat)
    total_mb = 8 * mb
    print(f"8 writers x {mb} MB (median of {repeat})")
    print(f"  {'8 x writer | cat > file':44s} {base:6.2f} s  {total_mb / base:7.0f} MB/s")
    for name, (times, rss) in results.items():
        t = statistics.median(times)
        print(f"  {name:44s} {t:6.2f} s  {total_mb / t:7.0f} MB/s  {base / t:5.2f}x of cat"
              f"  launcher peak RSS {max(rss):5.1f} MB (goal >= 0.8x, < 60 MB)")


if __name__ == "__main__":
    main()
