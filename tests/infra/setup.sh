#!/bin/sh
# Install what the real-SSH test hosts need (tests/infra/hosts.py): sshd, ssh, ssh-keygen, ip; Open MPI 4
# (Debian's openmpi-bin: the system mpirun the MPI tests use), a C++ toolchain (Horovod's build) and the
# Slurm test cluster (tests/infra/slurm.py): slurmctld, slurmd, slurm-client, munge, libpmix-dev
# (srun --mpi=pmix), and Chromium (the HTML report is checked in headless Chromium: tests/test_report.py).
# apt starts none of the daemons here; the test fixtures do.
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
slurm_missing=""
[ -x /usr/sbin/slurmctld ] || slurm_missing="$slurm_missing slurmctld"
[ -x /usr/sbin/slurmd ] || slurm_missing="$slurm_missing slurmd"
for tool in sbatch srun salloc scontrol sinfo squeue scancel; do
    command -v "$tool" >/dev/null 2>&1 || { slurm_missing="$slurm_missing slurm-client"; break; }
done
[ -x /usr/sbin/munged ] || slurm_missing="$slurm_missing munged"
dpkg-query -W -f='${Status}' libpmix-dev 2>/dev/null | grep -q "ok installed" || slurm_missing="$slurm_missing libpmix-dev"
chromium_missing=""
[ -x /usr/bin/chromium ] || chromium_missing=" chromium"
for tool in unshare nsenter setsid; do     # util-linux: essential on Debian/Ubuntu, never installed here
    command -v "$tool" >/dev/null 2>&1 || echo "setup.sh: warning: $tool not found (util-linux); SSH host and Slurm tests will skip" >&2
done

if [ -z "$missing$slurm_missing$chromium_missing" ]; then
    echo "setup.sh: openssh-server, openssh-client, iproute2, openmpi-bin, g++/make, slurmctld, slurmd," \
         "slurm-client, munge, libpmix-dev and chromium already present"
    exit 0
fi
echo "setup.sh: missing:$missing$slurm_missing$chromium_missing"
if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: warning: not root, not installing; SSH host and Slurm tests will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: warning: apt-get not available; SSH host and Slurm tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q; then
    echo "setup.sh: warning: apt-get update failed; trying the install anyway" >&2
fi
if [ -n "$missing" ]; then
    if apt-get install -y -q --no-install-recommends openssh-server openssh-client iproute2 openmpi-bin g++ make; then
        mkdir -p /run/sshd
        echo "setup.sh: installed openssh-server openssh-client iproute2 openmpi-bin g++ make"
    else
        echo "setup.sh: warning: apt-get install of the SSH/MPI packages failed; SSH host tests will skip" >&2
    fi
fi
if [ -n "$slurm_missing" ]; then
    # a separate transaction: a Slurm package missing from the mirror must not cost the SSH hosts
    if apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge libpmix-dev; then
        echo "setup.sh: installed slurmctld slurmd slurm-client munge libpmix-dev (daemons not started)"
    else
        echo "setup.sh: warning: apt-get install of the Slurm packages failed; Slurm tests will skip" >&2
    fi
fi
if [ -n "$chromium_missing" ]; then
    if apt-get install -y -q --no-install-recommends chromium; then
        echo "setup.sh: installed chromium"
    else
        echo "setup.sh: warning: apt-get install of chromium failed; the report's browser test will fail in CI" >&2
    fi
fi
exit 0
