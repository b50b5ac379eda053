"""Hosts: --hosts, hostfiles, Slurm nodelists and counts, PBS node files, locality, selection."""
from __future__ import annotations

import pytest

from tflaunch.spec import hosts as H
from tflaunch.errors import SpecError
from tflaunch.spec.hosts import (Host, discover, expand_counts, expand_nodelist, from_pbs, from_slurm, is_local,
                                 parse_hostfile, parse_hostfile_text, parse_hosts, select_hosts)


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(SpecError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)
    return str(info.value)


# --hosts ----------------------------------------------------------------------------------------------

def test_parse_hosts_horovodrun_syntax():
    assert parse_hosts("h1:4,h2:4") == [Host("h1", 4), Host("h2", 4)]
    assert parse_hosts(" h1 , gpu-02.cluster_x:2 ") == [Host("h1", 1), Host("gpu-02.cluster_x", 2)]
    assert parse_hosts("[::1]:2,[fe80::1%eth0],10.0.0.5:8") == [
        Host("::1", 2), Host("fe80::1%eth0", 1), Host("10.0.0.5", 8)]


@pytest.mark.parametrize("text, message", [
    ("", "--hosts: empty"),
    ("  ", "--hosts: empty"),
    ("h1,,h2", "--hosts: empty item in 'h1,,h2'"),
    ("h1,", "--hosts: empty item"),
    ("h1:x", "--hosts: 'h1:x': slots must be a whole number >= 1"),
    ("h1:0", "--hosts: 'h1:0': slots must be a whole number >= 1"),
    ("h1:-2", "slots must be a whole number >= 1"),
    ("h1:", "--hosts: 'h1:': slots must be a whole number >= 1"),
    ("h1:2,h2,H1:3", "--hosts: host 'H1' is listed twice"),
    ("-oProxyCommand=x", "--hosts: '-oProxyCommand=x': host name starts with '-'"),
    ("-oProxyCommand=x:2", "host name starts with '-'"),
    ("h 1:2", "--hosts: 'h 1:2': host name may contain only letters"),
    ("h1;rm:2", "host name may contain only letters"),
    ("user@h1", "host name may contain only letters"),
    (":4", "--hosts: ':4': host name is empty"),
    ("::1:2", "put IPv6 addresses in brackets"),
    ("[::1", "write IPv6 addresses as '[ADDRESS]'"),
    ("[::1]2", "write IPv6 addresses as '[ADDRESS]'"),
    ("[h1]:2", "host name may contain only letters"),
])
def test_parse_hosts_errors(text, message):
    got = error(parse_hosts, text)
    assert got.startswith("--hosts: ") and message in got


def test_parse_hosts_names_its_source():
    assert error(parse_hosts, "a:x", source="TFLAUNCH_HOSTS").startswith("TFLAUNCH_HOSTS: 'a:x'")


# hostfiles --------------------------------------------------------------------------------------------

MESSY = (
    "# cluster nodes\r\n"
    "\r\n"
    "node1 slots=4   # the head node\r\n"
    "   \t\r\n"
    "node2    slots=2 max_slots=8\r\n"
    "node3\r\n"
    "#node4 slots=9\r\n"
    "[fe80::2] slots=2\r\n"
    "node5 slots=1"  # no trailing newline
)


def test_messy_hostfile():
    assert parse_hostfile_text(MESSY) == [
        Host("node1", 4), Host("node2", 2), Host("node3", 1), Host("fe80::2", 2), Host("node5", 1)]


@pytest.mark.parametrize("text, message", [
    ("# a\nn1 slots=2\n\nn2\nn1 slots=3\n", "hosts.txt line 5: host 'n1' already listed on line 2"),
    ("# a\r\n\r\nnode1 4\r\n", "hosts.txt line 3: expected 'HOST slots=N', got 'node1 4' (missing 'slots=')"),
    ("n0\n\nnode1 fast", "hosts.txt line 3: expected 'HOST slots=N', got 'node1 fast'"),
    ("\n\nnode1 slots=", "hosts.txt line 3: 'node1 slots=': slots must be a whole number >= 1"),
    ("node1 slots=abc # x", "hosts.txt line 1: 'node1 slots=abc': slots must be a whole number >= 1"),
    ("node1 slots=0", "hosts.txt line 1: 'node1 slots=0': slots must be a whole number >= 1"),
    ("node1 slots=2 max_slots=x", "hosts.txt line 1: 'node1 slots=2 max_slots=x': max_slots must be"),
    ("node1 slots=2 slots=3", "hosts.txt line 1: 'node1 slots=2 slots=3': 'slots' given twice"),
    ("n\nnode1 cpus=2", "hosts.txt line 2: 'node1 cpus=2': unknown key 'cpus'"),
    ("-F/tmp/x slots=1", "hosts.txt line 1: '-F/tmp/x slots=1': host name starts with '-'"),
    ("", "hostfile hosts.txt: no hosts in it"),
    ("# only a comment\n\n   \n", "hostfile hosts.txt: no hosts in it"),
])
def test_hostfile_errors_name_file_and_line(text, message):
    assert error(parse_hostfile_text, text, source="hosts.txt").startswith(message)


def test_duplicate_in_the_messy_file_counts_crlf_lines():
    message = error(parse_hostfile_text, MESSY + "\r\n\r\nnode2 slots=1\r\n", source="hosts.txt")
    assert message == "hosts.txt line 11: host 'node2' already listed on line 5"


def test_parse_hostfile_reads_the_file(tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_bytes(MESSY.encode())
    assert parse_hostfile(str(path))[0] == Host("node1", 4)
    path.write_text("a slots=1\nb slots=x\n")
    assert error(parse_hostfile, str(path)).startswith(f"{path} line 2: 'b slots=x'")
    path.write_text("\n")
    assert error(parse_hostfile, str(path)).startswith(f"hostfile {path}: no hosts in it")
    missing = tmp_path / "nope.txt"
    assert error(parse_hostfile, str(missing)) == (
        f"hostfile {missing}: cannot read: No such file or directory")
    assert error(parse_hostfile, str(tmp_path)).startswith(f"hostfile {tmp_path}: cannot read: ")
    path.write_bytes(b"\xff\xfe host")
    assert error(parse_hostfile, str(path)).endswith("cannot read: not UTF-8 text")


def test_default_source_says_hostfile_once():
    assert error(parse_hostfile_text, "").startswith("hostfile: no hosts in it")
    assert error(parse_hostfile_text, "a b").startswith("hostfile line 1: ")


# Slurm ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, names", [
    ("n[009-011],gpu-[09-10],login1", ["n009", "n010", "n011", "gpu-09", "gpu-10", "login1"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[98-101]", ["n98", "n99", "n100", "n101"]),
    ("n[1,3-5,07]", ["n1", "n3", "n4", "n5", "n07"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("[1-2]x", ["1x", "2x"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("single", ["single"]),
    ("a b\tc", ["a", "b", "c"]),  # Slurm separates at whitespace too
    ("n[3-3]", ["n3"]),
])
def test_expand_nodelist(text, names):
    assert expand_nodelist(text) == names


@pytest.mark.parametrize("text, message", [
    ("n[1-2", "unbalanced brackets"),
    ("n1-2]", "unbalanced or nested brackets"),
    ("n[[1-2]]", "unbalanced or nested brackets"),
    ("n[]", "empty brackets"),
    ("n[ ]", "empty brackets"),
    ("n[5-3]", "range '5-3' starts after it ends"),
    ("n[a-b]", "'a-b' in '[a-b]' is not a number or a range N-M"),
    ("n[1,,2]", "'' in '[1,,2]' is not a number"),
    ("n[1-]", "is not a number or a range"),
    ("n[1-2-3]", "is not a number or a range"),
    ("n[0-99999999]", "more than 65536 hosts"),
    ("a[0-999]b[0-999]", "more than 65536 hosts"),
    ("", "no hosts in it"),
    ("-n[1-2]", "host name starts with '-'"),
])
def test_expand_nodelist_errors(text, message):
    got = error(expand_nodelist, text, source="SLURM_JOB_NODELIST")
    assert got.startswith(f"SLURM_JOB_NODELIST {text!r}: ") and message in got


def test_expand_a_thousand_nodes():  # its speed: bench/scale_checks.py
    names = expand_nodelist("n[0001-1000]")
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "n0001" and names[-1] == "n1000" and all(len(n) == 5 for n in names)


@pytest.mark.parametrize("text, counts", [
    ("2(x3),1", [2, 2, 2, 1]),
    ("4", [4]),
    ("8(x2)", [8, 8]),
    ("1,2, 3", [1, 2, 3]),
])
def test_expand_counts(text, counts):
    assert expand_counts(text) == counts


@pytest.mark.parametrize("text", ["", "2(x3", "x", "2(3)", "0", "2(x0)", "2,,1", "-1", "2(x3)1"])
def test_expand_counts_errors(text):
    assert error(expand_counts, text, source="SLURM_TASKS_PER_NODE").startswith(
        f"SLURM_TASKS_PER_NODE {text!r}: ")


def test_from_slurm():
    assert from_slurm({"SLURM_NODELIST": "n1"}) is None
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-3],x", "SLURM_TASKS_PER_NODE": "2(x3),1",
           "SLURM_JOB_CPUS_PER_NODE": "64(x4)"}
    assert from_slurm(env) == [Host("n1", 2), Host("n2", 2), Host("n3", 2), Host("x", 1)]
    del env["SLURM_TASKS_PER_NODE"]
    assert from_slurm(env) == [Host(n, 64) for n in ("n1", "n2", "n3", "x")]
    del env["SLURM_JOB_CPUS_PER_NODE"]
    assert from_slurm(env) == [Host(n, 1) for n in ("n1", "n2", "n3", "x")]
    assert from_slurm({"SLURM_JOB_ID": "1", "SLURM_NODELIST": "a[1-2]"}) == [Host("a1"), Host("a2")]


def test_from_slurm_mismatch_names_both_variables():
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x3)"}
    assert error(from_slurm, env).startswith(
        "SLURM_TASKS_PER_NODE='2(x3)' gives 3 counts but SLURM_JOB_NODELIST='n[1-2]' names 2 nodes")
    assert "SLURM_JOB_NODELIST is not" in error(from_slurm, {"SLURM_JOB_ID": "42"})
    bad = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-"}
    assert error(from_slurm, bad).startswith("SLURM_JOB_NODELIST 'n[1-': unbalanced")


# PBS --------------------------------------------------------------------------------------------------

def test_from_pbs(tmp_path):
    assert from_pbs({}) is None
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("b\nb\na\nb\n\nc\na\n")
    assert from_pbs({"PBS_NODEFILE": str(nodefile)}) == [Host("b", 3), Host("a", 2), Host("c", 1)]
    nodefile.write_text("\n\n")
    assert error(from_pbs, {"PBS_NODEFILE": str(nodefile)}) == f"PBS_NODEFILE {nodefile}: no hosts in it"
    missing = str(tmp_path / "gone")
    assert error(from_pbs, {"PBS_NODEFILE": missing}).startswith(f"PBS_NODEFILE {missing}: cannot read: ")
    nodefile.write_text("a\n-oX\n")
    assert "line 2: host name starts with '-'" in error(from_pbs, {"PBS_NODEFILE": str(nodefile)})


def test_discover_prefers_slurm_then_pbs(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("p1\np1\n")
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "s[1-2]"}
    pbs = {"PBS_NODEFILE": str(nodefile)}
    assert discover({**slurm, **pbs}) == ([Host("s1"), Host("s2")], "SLURM_JOB_NODELIST")
    assert discover(pbs) == ([Host("p1", 2)], "PBS_NODEFILE")
    assert discover({}) == (None, "local")


def test_discover_reads_os_environ(monkeypatch):
    for name in ("SLURM_JOB_ID", "PBS_NODEFILE"):
        monkeypatch.delenv(name, raising=False)
    assert discover() == (None, "local")
    monkeypatch.setenv("SLURM_JOB_ID", "3")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "z1")
    monkeypatch.delenv("SLURM_TASKS_PER_NODE", raising=False)
    monkeypatch.delenv("SLURM_JOB_CPUS_PER_NODE", raising=False)
    assert discover() == ([Host("z1")], "SLURM_JOB_NODELIST")


# locality ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, local", [
    ("localhost", True), ("LOCALHOST", True), ("localhost.localdomain", True),
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
    ("node7", True), ("Node7", True), ("node7.cluster.org", True), ("node7.other", True),
    ("node8", False), ("node70", False), ("10.0.0.7", False), ("128.0.0.1", False), ("", False),
])
def test_is_local(monkeypatch, name, local):
    monkeypatch.setattr(H, "_nodename", lambda: "node7.cluster.org")
    assert is_local(name) is local


def test_is_local_with_short_nodename_and_real_nodename(monkeypatch):
    import os
    assert is_local(os.uname().nodename)
    monkeypatch.setattr(H, "_nodename", lambda: "node7")
    assert is_local("node7.cluster.org") and not is_local("node.cluster.org")
    monkeypatch.setattr(H, "_nodename", lambda: "")
    assert is_local("localhost") and not is_local("node7")


# selection --------------------------------------------------------------------------------------------

def test_select_hosts_local_machine():
    assert select_hosts(None, 1, 4) == [Host("localhost", 4)]
    assert error(select_hosts, None, 2, 1) == (
        "--nodes 2 needs hosts: give --hosts or --hostfile (the local machine is one node)")


def test_select_hosts_takes_the_first_nodes():
    hosts = parse_hosts("a:4,b:2,c:8")
    assert select_hosts(hosts, 1, 4) == [Host("a", 4)]
    assert select_hosts(hosts, 2, 2) == [Host("a", 4), Host("b", 2)]
    assert select_hosts(hosts, 3, 2) == hosts


def test_select_hosts_errors_and_oversubscribe():
    hosts = [Host("a", 4), Host("b", 2)]
    assert error(select_hosts, hosts, 3, 1) == "--nodes 3 but --hosts gives only 2 hosts (a, b)"
    assert error(select_hosts, hosts, 3, 1, oversubscribe=True).startswith("--nodes 3 but")
    assert error(select_hosts, hosts, 2, 4) == (
        "--procs-per-node 4 but host 'b' has 2 slots in --hosts "
        "(use --oversubscribe to run more processes than slots)")
    assert select_hosts(hosts, 2, 4, oversubscribe=True) == hosts
    assert "has 1 slot in SLURM_JOB_NODELIST" in error(
        select_hosts, [Host("n1")], 1, 2, source="SLURM_JOB_NODELIST")
    assert error(select_hosts, [Host("a")], 2, 1, source="hosts.txt") == (
        "--nodes 2 but hosts.txt gives only 1 host (a)")
    assert error(select_hosts, [], 1, 1) == "--nodes 1 but --hosts gives no hosts"
    many = [Host(f"n{i}") for i in range(20)]
    assert error(select_hosts, many, 21, 1).endswith("(n0, n1, n2, n3, n4, n5, n6, n7, ...)")
    assert "must be >= 1" in error(select_hosts, hosts, 0, 1)
