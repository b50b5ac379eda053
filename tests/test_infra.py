"""Sanity checks of the real SSH test hosts (tests/infra/hosts.py) the launcher tests use."""
from __future__ import annotations

import os
import socket
import subprocess
import shutil
from pathlib import Path

import pytest

from conftest import INFRA_ROOT
from tests.infra import hosts as infra_hosts


def ssh(hosts, name: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", hosts.config, name, command], capture_output=True, text=True,
                          timeout=30)


def test_loopback_aliases_answer(ssh_loopback):
    assert ssh_loopback.names == ["loop1", "loop2"]
    for name in ssh_loopback.names:
        result = ssh(ssh_loopback, name, "echo ok")
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_netns_hosts_have_own_hostname_and_address(netns_hosts):
    assert netns_hosts.names == ["h1", "h2", "h3"]
    assert len(set(netns_hosts.addresses.values())) == 3
    for name in netns_hosts.names:
        result = ssh(netns_hosts, name, "hostname; ip -4 -o addr show dev eth0")
        assert result.returncode == 0, result.stderr
        hostname, addr_line = result.stdout.splitlines()[:2]
        assert hostname == name
        assert f" {netns_hosts.addresses[name]}/24 " in addr_line


def test_netns_h3_does_not_share_tmp_path(netns_hosts, tmp_path: Path):
    path = tmp_path / "shared.txt"
    path.write_text("seen\n")
    for name in ("h1", "h2"):
        result = ssh(netns_hosts, name, f"cat {path}")
        assert (result.returncode, result.stdout) == (0, "seen\n"), result.stderr
    result = ssh(netns_hosts, "h3", f"cat {path}")
    assert result.returncode != 0 and result.stdout == ""
    # and what h3 writes there stays on h3
    assert ssh(netns_hosts, "h3", f"mkdir -p {tmp_path} && echo h3 > {tmp_path}/h3.txt").returncode == 0
    assert not (tmp_path / "h3.txt").exists()


def _connectable(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_stop_removes_everything():
    if infra_hosts.missing_requirements(netns=True):
        pytest.skip(infra_hosts.missing_requirements(netns=True))
    workdir = INFRA_ROOT / "stoptest"
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        loop = infra_hosts.start_loopback(str(workdir / "loop"), names=("l1",))
        net = infra_hosts.start_netns(str(workdir / "net"), names=("s1",))
        ns, bridge, links = net.namespaces["s1"], net.bridge, list(net.links)
        pids = [p.pid for p in loop.procs.values()] + [p.pid for p in net.procs.values()]
        assert os.path.exists(f"/run/netns/{ns}")
        assert ssh(net, "s1", "hostname").stdout == "s1\n"
        port = loop.ports["l1"]
        loop.stop()
        net.stop()
        net.stop()          # idempotent
        assert not os.path.exists(f"/run/netns/{ns}")
        for link in [bridge, *links]:
            assert subprocess.run(["ip", "link", "show", link], capture_output=True).returncode != 0, link
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}"), pid
        assert not _connectable("127.0.0.1", port)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            INFRA_ROOT.rmdir()
        except OSError:
            pass
