"""tflaunch.plan.mpirun: flavour detection and the mpirun command line each flavour gets (pure)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tflaunch.errors import SpecError
from tflaunch.plan.mpirun import HOSTLIST_MAX, MpiInstall, launcher, parse_version, ssh_wrapper

# What `mpirun --version` says (first lines), from the installs the tests use.
VERSIONS = {
    "mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n": ("openmpi", "4.1.4"),
    "mpirun (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/\n": ("openmpi", "5.0.11"),
    "HYDRA build details:\n    Version:                                 5.0.2\n"
    "    Release Date:                            Fri Sep 25 20:45:26 UTC 2026\n": ("mpich", "5.0.2"),
    "Intel(R) MPI Library for Linux* OS, Version 2021.18.1 Build 20260626 (id: b44796a)\n"
    "Copyright 2003-2026, Intel Corporation.\n": ("intel", "2021.18.1"),
}

OMPI4 = MpiInstall("/usr/bin/mpirun", "openmpi", "4.1.4")
OMPI5 = MpiInstall("/v/bin/mpirun", "openmpi", "5.0.11")
MPICH = MpiInstall("/m/bin/mpirun", "mpich", "5.0.2")
INTEL = MpiInstall("/i/bin/mpirun", "intel", "2021.18.1")
PROGRAM = ["python3", "-c", "BOOT", "python3", "train.py"]


@pytest.mark.parametrize("text,expected", list(VERSIONS.items()))
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_parse_version_unknown():
    assert parse_version("mpiexec (some other MPI) 1.0") is None


def build(install, hosts, **kw):
    kw.setdefault("files_dir", "/r/mpi")
    kw.setdefault("remote", False)
    kw.setdefault("as_root", False)
    return launcher(install, hosts, PROGRAM, {"TFLAUNCH_RUN_ID": "x", "MYVAR": "1"}, **kw)


def test_open_mpi_command_line():
    argv = build(OMPI4, [("a", 2), ("b", 2)], remote=True, as_root=True, user_args=["--mca", "btl", "tcp"]).argv
    assert argv == ["/usr/bin/mpirun", "-np", "4", "--host", "a:2,b:2", "--bind-to", "none", "--map-by", "slot",
                    "--wdir", "/", "--allow-run-as-root", "--mca", "plm_rsh_agent", "/r/mpi/ssh", "--mca", "plm_rsh_no_tree_spawn",
                    "1", "-x", "MYVAR", "-x", "TFLAUNCH_RUN_ID", "--mca", "btl", "tcp", *PROGRAM]


def test_open_mpi_5_agent_is_a_prte_parameter():
    argv = build(OMPI5, [("a", 1), ("b", 1)], remote=True).argv
    assert argv[argv.index("plm_ssh_agent") - 1:argv.index("plm_ssh_agent") + 2] == ["--prtemca", "plm_ssh_agent",
                                                                                    "/r/mpi/ssh"]
    assert "--allow-run-as-root" not in argv  # only as root


def test_mpich_gets_hydra_options_not_open_mpi_ones():
    """MPICH rejects -H/--host/-x/--oversubscribe: the same job is spelled the Hydra way."""
    argv = build(MPICH, [("a", 2), ("b", 2)], remote=True, as_root=True, oversubscribe=True).argv
    assert argv == ["/m/bin/mpirun", "-n", "4", "-hosts", "a:2,b:2", "-bind-to", "none", "-wdir", "/",
                    "-launcher", "ssh",
                    "-launcher-exec", "/r/mpi/ssh", "-genvlist", "MYVAR,TFLAUNCH_RUN_ID", *PROGRAM]
    for option in ("-H", "--host", "-x", "--oversubscribe", "--allow-run-as-root", "-np"):
        assert option not in argv


def test_intel_uses_ppn_and_refuses_uneven_hosts():
    argv = build(INTEL, [("a", 2), ("b", 2)], remote=True).argv
    assert argv[:7] == ["/i/bin/mpirun", "-n", "4", "-hosts", "a,b", "-ppn", "2"]
    assert "-bootstrap-exec" in argv and ["-genv", "I_MPI_PIN", "off"] == argv[7:10]
    with pytest.raises(SpecError, match=r"Intel MPI places the same number of processes on every host.*a: 2, b: 4"):
        build(INTEL, [("a", 2), ("b", 4)])
    assert "a:2,b:4" in build(MPICH, [("a", 2), ("b", 4)]).argv  # Hydra and Open MPI can say it


def test_local_job_needs_no_agent():
    argv = build(OMPI4, [("localhost", 4)]).argv
    assert "plm_rsh_agent" not in " ".join(argv)


@pytest.mark.parametrize("install,option,line", [(OMPI4, "--hostfile", "h0 slots=2\n"), (MPICH, "-f", "h0:2\n"),
                                                 (INTEL, "-machinefile", "h0:2\n")])
def test_many_hosts_go_to_a_hostfile(install, option, line):
    hosts = [(f"h{i}", 2) for i in range(HOSTLIST_MAX + 1)]
    launch = build(install, hosts)
    assert launch.argv[launch.argv.index(option) + 1] == "/r/mpi/hostfile"
    content, _ = launch.files["hostfile"]
    assert content.startswith(line) and content.count("\n") == len(hosts)
    assert launch.argv[launch.argv.index("-np" if install is OMPI4 else "-n") + 1] == str(2 * len(hosts))


def test_inside_slurm_mpirun_uses_the_allocation_and_srun_is_possible():
    argv = build(OMPI4, [("n1", 2), ("n2", 2)], remote=True, in_slurm=True).argv
    assert "plm_rsh_agent" not in argv
    argv = build(OMPI4, [("n1", 2), ("n2", 2)], remote=True, in_slurm=True, use_srun="pmix").argv
    assert argv[:6] == ["srun", "--mpi=pmix", "--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--nodelist=n1,n2"]
    assert argv[-len(PROGRAM):] == PROGRAM


def test_launcher_path_puts_mpiruns_directory_first():
    assert build(INTEL, [("a", 1)], path="/usr/bin:/bin").path == "/i/bin:/usr/bin:/bin"


def test_ssh_wrapper_passes_mpiruns_options_and_marks_the_remote_command(tmp_path):
    """The wrapper as mpirun calls it: [ssh options] HOST WORDS...; a stand-in `ssh` records its argv."""
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    fake.chmod(0o755)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(ssh_wrapper(["ssh", "-T", "-F", "/cfg"], "RUN1", sys.executable))
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    out = subprocess.run([str(wrapper), "-x", "-l", "me", "node7", "orted", "-mca", "ess", "env"],
                         capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out == ["-T", "-F", "/cfg", "-x", "-l", "me", "--", "node7",
                   "export TFLAUNCH_RUN_ID=RUN1; orted -mca ess env"]


def test_network_interface_per_flavour():
    argv = build(OMPI4, [("a", 1)], iface="10.1.2.0/24").argv
    assert argv[argv.index("oob_tcp_if_include") + 1] == "10.1.2.0/24"
    assert argv[argv.index("btl_tcp_if_include") + 1] == "10.1.2.0/24"
    argv = build(MPICH, [("a", 1)], iface="ib0").argv
    assert argv[argv.index("-iface") + 1] == "ib0"
    with pytest.raises(SpecError, match=r"MPICH takes an interface name \(-iface\), not a subnet like 10.1.2.0/24"):
        build(MPICH, [("a", 1)], iface="10.1.2.0/24")


def test_find_mpirun_prefers_the_job_pythons_own(tmp_path):
    from tflaunch.plan.mpirun import find_mpirun

    venv, system = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    for d in (venv, system):
        d.mkdir(parents=True)
        (d / "mpirun").write_text("#!/bin/sh\n")
        (d / "mpirun").chmod(0o755)
    (venv / "python").write_text("")
    env = {"PATH": str(system)}
    assert find_mpirun(None, str(venv / "python"), env) == str(venv / "mpirun")
    assert find_mpirun(None, "/nowhere/python", env) == str(system / "mpirun")
    assert find_mpirun(str(system / "mpirun"), str(venv / "python"), env) == str(system / "mpirun")
    if not os.access(os.path.join(os.path.dirname(sys.executable), "mpirun"), os.X_OK):
        with pytest.raises(SpecError, match=r"\[mpi\]"):
            find_mpirun(None, "/nowhere/python", {"PATH": str(tmp_path / "empty")})
