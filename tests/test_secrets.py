"""Secret environment variables never reach the run store, and the home is owner-only (issue 19, item 7):
real runs (attached, detached, Slurm-queued), then every file of the home read back."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, show, wait_status

TOKEN, PASSWORD, PLAIN = "s3cr3t-value-tok", "hunter2-pass-word", "visible-plain"
SECRETS = (TOKEN.encode(), PASSWORD.encode())
SCRIPT = """\
import hashlib, json, os
got = {k: hashlib.sha256(os.environ.get(k, "").encode()).hexdigest() for k in ("HF_TOKEN", "MY_PASSWORD", "PLAIN")}
print(json.dumps(got), flush=True)
"""
ENV_ARGS = ("--env", f"HF_TOKEN={TOKEN}", "--env", f"MY_PASSWORD={PASSWORD}", "--env", f"PLAIN={PLAIN}")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _got(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _no_secret_anywhere(home: Path) -> list[Path]:
    """Every file of the home, read as bytes: none holds a secret value; returns the files read."""
    files = []
    for dirpath, dirnames, filenames in os.walk(home):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            for secret in SECRETS:
                assert secret not in data, f"{path} holds a secret value"
            files.append(path)
    assert not list(home.glob("runs/*/start-secrets.json")), "the owner-only start file was left behind"
    return files


@pytest.fixture
def proj(project):
    return project(**{"train.py": SCRIPT})


def test_attached_and_detached_runs_keep_no_secret(cli, home, proj):
    attached = cli("run", "--source-dir", str(proj), *ENV_ARGS, "train.py", check=True)
    assert _got(attached.stdout) == {"HF_TOKEN": _sha(TOKEN), "MY_PASSWORD": _sha(PASSWORD), "PLAIN": _sha(PLAIN)}
    detached = cli("run", "--source-dir", str(proj), "--detach", *ENV_ARGS, "train.py", check=True)
    run_id = detached.stdout.strip()
    run = wait_status(cli, run_id, {"Completed", "Failed", "Canceled"})
    assert run["status"] == "Completed", run
    assert _got(cli("runs", "logs", run_id, check=True).stdout)["HF_TOKEN"] == _sha(TOKEN)

    files = _no_secret_anywhere(home)
    assert len(files) > 10
    # the plain variable is recorded; the secret ones by name only
    definition = json.loads((Path(run["run_dir"]) / "run.json").read_text())
    assert definition["spec"]["environment_variables"] == {"PLAIN": PLAIN}
    assert definition["withheld_environment"] == ["HF_TOKEN", "MY_PASSWORD"]
    assert run["withheld_environment"] == ["HF_TOKEN", "MY_PASSWORD"]
    assert run["environment_variables"] == ["HF_TOKEN", "MY_PASSWORD", "PLAIN"]
    text = cli("runs", "show", run_id, check=True).stdout
    assert "withheld:    HF_TOKEN, MY_PASSWORD" in text
    # owner-only: the new home, its directories and the record's files
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for sub in ("runs", "experiments", "objects", "cache", f"runs/{run_id}"):
        assert stat.S_IMODE((home / sub).stat().st_mode) == 0o700, sub
    for name in ("run.json", "status.json", "events.jsonl", "snapshot.json"):
        assert stat.S_IMODE((Path(run["run_dir"]) / name).stat().st_mode) == 0o600, name
    # runs diff and the report show no value
    first = json.loads(cli("runs", "list", "--json", check=True).stdout)[-1]["id"]
    diff = cli("runs", "diff", first, run_id, check=True)
    report = cli("runs", "report", first, run_id, "-o", str(home.parent / "report.html"))
    for secret in SECRETS:
        assert secret.decode() not in diff.stdout + diff.stderr
        if report.returncode == 0:
            assert secret not in (home.parent / "report.html").read_bytes()


def test_dry_run_and_rerun_need_the_values_again(cli, home, proj, tmp_path):
    plan = json.loads(cli("run", "--source-dir", str(proj), "--dry-run", "--json", *ENV_ARGS, "train.py",
                          check=True).stdout)
    env = plan["processes"][0]["env"]
    assert env["HF_TOKEN"] == env["MY_PASSWORD"] == "<withheld>" and env["PLAIN"] == PLAIN
    text = cli("run", "--source-dir", str(proj), "--dry-run", *ENV_ARGS, "train.py", check=True).stdout
    assert "HF_TOKEN=<withheld>" in text and TOKEN not in text
    cli("run", "--source-dir", str(proj), *ENV_ARGS, "train.py", check=True)
    run_id = json.loads(cli("runs", "list", "--json", check=True).stdout)[0]["id"]

    refused = cli("runs", "rerun", run_id)
    assert refused.returncode == 2 and "HF_TOKEN, MY_PASSWORD" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    again = cli("runs", "rerun", run_id, "--env", f"HF_TOKEN={TOKEN}",
                env=cli_env(home, MY_PASSWORD=PASSWORD), check=True)
    assert _got(again.stdout) == {"HF_TOKEN": _sha(TOKEN), "MY_PASSWORD": _sha(PASSWORD), "PLAIN": _sha(PLAIN)}
    _no_secret_anywhere(home)


def test_user_listed_names_and_group_shared_home(cli, home, proj):
    home.mkdir(mode=0o770)
    os.chmod(home, 0o770)
    (home / "config.json").write_text(json.dumps({"shared_group": True, "secret_env": ["WANDB_*"],
                                                  "public_env": ["KEYRING_BACKEND"]}))
    cli("run", "--source-dir", str(proj), "--env", "WANDB_API=wb-secret-1", "--env", "KEYRING_BACKEND=null",
        "--env", "OTHER=x", "train.py", check=True, env=cli_env(home, TFLAUNCH_SECRET_ENV="OTHER"))
    run = show(cli, json.loads(cli("runs", "list", "--json", check=True).stdout)[0]["id"])
    assert run["withheld_environment"] == ["OTHER", "WANDB_API"]
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"wb-secret-1" not in path.read_bytes(), path
    run_dir = Path(run["run_dir"])
    assert stat.S_IMODE(home.stat().st_mode) == 0o770  # the home's own mode is kept
    assert stat.S_IMODE((home / "runs").stat().st_mode) == 0o770
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o770
    assert stat.S_IMODE((run_dir / "run.json").stat().st_mode) == 0o660
    assert stat.S_IMODE((run_dir / "status.json").stat().st_mode) == 0o660


def test_existing_readable_home_is_warned_about_once(cli, home, proj):
    home.mkdir()
    os.chmod(home, 0o755)
    first = cli("run", "--source-dir", str(proj), "train.py", check=True)
    assert "can be read by other users (mode 0755)" in first.stderr
    second = cli("run", "--source-dir", str(proj), "train.py", check=True)
    assert "can be read by other users" not in second.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # not changed behind the user's back
    run_id = json.loads(cli("runs", "list", "--json", check=True).stdout)[0]["id"]
    assert stat.S_IMODE((home / "runs" / run_id).stat().st_mode) == 0o700


def test_slurm_queued_run_gets_the_values(slurm_clean, home, proj):
    env = {k: v for k, v in cli_env(home).items() if not k.startswith("SLURM_")}
    env.update(slurm_clean.env)
    result = subprocess.run([sys.executable, "-m", "tflaunch", "run", "--slurm", "--time", "5", *ENV_ARGS,
                             "train.py"], cwd=proj, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert _got(result.stdout)["HF_TOKEN"] == _sha(TOKEN)
    _no_secret_anywhere(home)


SWEEP_SCRIPT = """\
import argparse, hashlib, os
from tflaunch import Run
p = argparse.ArgumentParser()
p.add_argument("--x", type=float, default=0.0)
a = p.parse_args()
os.makedirs("outputs", exist_ok=True)
open("outputs/got.txt", "w").write(hashlib.sha256(os.environ.get("HF_TOKEN", "").encode()).hexdigest())
Run.get_context().log("score", a.x)
"""


def test_sweep_trials_get_the_values(cli, home, project):
    src = project(**{"sweep.py": SWEEP_SCRIPT})
    result = cli("sweep", "--param=--x=choice(1, 2)", "--sampling", "grid", "--primary-metric", "score",
                 "--goal", "maximize", "--max-total-runs", "2", "--source-dir", str(src), *ENV_ARGS, "sweep.py",
                 timeout=180)
    assert result.returncode == 0, result.stderr
    got = sorted(home.glob("runs/*/outputs/got.txt"))
    assert len(got) == 2 and {p.read_text() for p in got} == {_sha(TOKEN)}
    _no_secret_anywhere(home)
