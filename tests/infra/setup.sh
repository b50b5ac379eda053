#!/bin/sh
# Install what the real-SSH test hosts need (tests/infra/hosts.py): sshd, ssh, ssh-keygen, ip; Open MPI 4
# (Debian's openmpi-bin: the system mpirun the MPI tests use) and a C++ toolchain (Horovod's build).
# Idempotent; for CI on a fresh Debian/Ubuntu machine.  Never fails the build: if something can't be
# installed it prints a warning and the tests that need it skip with a reason.
# Usage (as root):  sh tests/infra/setup.sh
missing=""
[ -x /usr/sbin/sshd ] || missing="$missing sshd"
command -v ssh >/dev/null 2>&1 || missing="$missing ssh"
command -v ssh-keygen >/dev/null 2>&1 || missing="$missing ssh-keygen"
command -v ip >/dev/null 2>&1 || missing="$missing ip"
[ -x /usr/bin/mpirun ] || missing="$missing mpirun"
command -v g++ >/dev/null 2>&1 || missing="$missing g++"
command -v make >/dev/null 2>&1 || missing="$missing make"
for tool in unshare nsenter setsid; do     # util-linux: essential on Debian/Ubuntu, never installed here
    command -v "$tool" >/dev/null 2>&1 || echo "setup.sh: warning: $tool not found (util-linux); SSH host tests will skip" >&2
done

if [ -z "$missing" ]; then
    echo "setup.sh: openssh-server, openssh-client, iproute2, openmpi-bin and g++/make already present"
    exit 0
fi
echo "setup.sh: missing:$missing"
if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: warning: not root, not installing; SSH host tests will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: warning: apt-get not available; SSH host tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -q && apt-get install -y -q --no-install-recommends openssh-server openssh-client iproute2 \
        openmpi-bin g++ make; then
    mkdir -p /run/sshd
    echo "setup.sh: installed openssh-server openssh-client iproute2 openmpi-bin g++ make"
else
    echo "setup.sh: warning: apt-get failed; SSH host tests will skip" >&2
fi
exit 0
