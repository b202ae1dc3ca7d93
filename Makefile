# slimflow: `make run` and `make test` install whatever is missing first.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.slimflow-installed

.PHONY: install run test test-fast bench repro ui prefect-ui lint-imports test-services gpu-bundle

$(STAMP): pyproject.toml scripts/install.sh scripts/lib/horovod_build.sh scripts/horovod/idle-cycle.patch
	bash scripts/install.sh

install: $(STAMP)

run: $(STAMP)  ## the whole pipeline on the default data set
	$(VENV)/bin/slimflow run

test-services:  ## system services the team-mode tests start (sshd, PostgreSQL, iproute2); root installs what is missing
	bash scripts/install_test_services.sh

test: $(STAMP) test-services  ## the whole test suite, real Horovod/Prefect/MLflow/DVC included
	$(PY) -m pytest

test-fast: $(STAMP)  ## unit tests only
	$(PY) -m pytest -m "not integration"

bench: $(STAMP)  ## benchmarks (not part of the tests)
	$(PY) benchmarks/run.py

gpu-bundle: $(STAMP)  ## .gpu-bundle/: what `scripts/gpu_check.sh --offline` needs on a GPU host with no package index (README "GPU check"); HOROVOD_WHEEL=DIR carries a prebuilt one
	$(PY) scripts/gpu_bundle.py $(if $(HOROVOD_WHEEL),--horovod-wheel $(HOROVOD_WHEEL))

repro: $(STAMP)  ## reproduce with DVC directly
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

# MLflow's server-side jobs (GenAI scorers, trace roll-ups; slimflow uses none) are 8 more
# processes and 1.8 GiB more memory: off unless set (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true make ui).
# MLflow's usage telemetry (the browser's clicks, sent on by the server) is off, as in slimflow's
# own processes (tasks/core/telemetry.py), unless set (MLFLOW_DISABLE_TELEMETRY=false make ui).
ui: $(STAMP)  ## the MLflow UI on http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
	MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} \
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: $(STAMP)  ## the Prefect UI with this project's flow runs: the background server runs use (started if none; prints its URL)
	$(VENV)/bin/slimflow prefect-server

lint-imports: $(STAMP)  ## the import contracts of pyproject.toml (also run by the tests)
	$(VENV)/bin/lint-imports
