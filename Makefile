# Two commands on a fresh machine:  `make sweep` (set up, run the main job), `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup sweep train test report bench browser postgres slurm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

sweep: $(STAMP)
	$(BIN)/python -m vae_lab.sweep
	$(BIN)/python -m analysis.report --study default

train: $(STAMP)
	$(BIN)/python -m vae_lab.train

# The serve page's end-to-end test drives Debian's headless Chromium; install it when missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# The many-machines test runs a throwaway PostgreSQL server; install Debian's when initdb is missing.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	fi

# The cluster test runs a throwaway single-node Slurm (munged, slurmctld, slurmd started by hand); install Debian's.
slurm:
	@if ! command -v sbatch >/dev/null || ! [ -x /usr/sbin/slurmctld ] || ! [ -x /usr/sbin/slurmd ] || ! [ -x /usr/sbin/munged ]; then \
		SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; \
	fi

test: $(STAMP) browser postgres slurm
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/single_run.py
	$(BIN)/python benchmarks/sweep.py

report: $(STAMP)
	$(BIN)/python -m analysis.report --study default

clean:
	rm -rf $(VENV) reports
