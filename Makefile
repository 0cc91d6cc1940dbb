# bp-service: every target works from a fresh clone; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The optional extras the tests cover (hpo, slurm) come from their own lock, on top of the main one.
$(STAMP): pyproject.toml requirements.lock requirements-extras.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock -r requirements-extras.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e '.[dev,hpo,slurm]'
	touch $@

install: $(STAMP) ## Create .venv and install the package (editable, dev extras) from the lock; no-op when up to date

train: $(STAMP) ## Train the digits experiment end to end (CPU or CUDA), recorded in the embedded MLflow store
	$(BIN)/bp-train experiment=digits $(ARGS)

# `make ui` is light by default: one web worker, and no job runner (MLflow's GenAI jobs and their Huey
# consumers). MLflow's own defaults: make ui UI_WORKERS=4 UI_JOBS=true
UI_WORKERS ?= 1
UI_JOBS    ?= false
ui: $(STAMP) ## Open the MLflow dashboard over the store every command uses, on its training-runs view (http://127.0.0.1:5000)
	@echo "MLflow dashboard, each experiment's runs with their metrics (all experiments: http://127.0.0.1:$(or $(PORT),5000)/#/experiments?workflowType=machine_learning):"
	@PORT=$(or $(PORT),5000) $(BIN)/bp-runs dashboard
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$(UI_JOBS) $(BIN)/mlflow ui --workers $(UI_WORKERS) \
	  --backend-store-uri "$$($(BIN)/bp-runs uri)" --host 127.0.0.1 --port $(or $(PORT),5000)

explain: $(STAMP) ## Show the worked example: every chain-rule factor of the 3-2-1 network, with numbers
	$(BIN)/bp-explain $(ARGS)

bench: $(STAMP) ## Benchmark against native autograd, plain loops and scikit-learn (writes bench.json)
	$(BIN)/bp-bench --json bench.json $(ARGS)

# The fast suite runs on every core (pytest-xdist), a test file per worker so its shared fixtures are built
# once; the slow suite stays serial: its kill, signal and DDP tests time real processes.
test: $(STAMP) ## Run the fast test suite (not slow, not gpu), on every core
	$(BIN)/pytest -m "not slow and not gpu" -n auto --dist loadfile $(PYTEST_ARGS)

test-slow: $(STAMP) ## Run the slow tests (CI runs these after `make test`)
	$(BIN)/pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-gpu: $(STAMP) ## Run the CUDA tests (needs a GPU)
	$(BIN)/pytest -m gpu $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check + ruff format --check + hadolint on the Dockerfiles
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cuda

docs: $(STAMP) ## Build the docs site (README's pages in docs/) into site/ with MkDocs; a broken link or anchor fails
	$(BIN)/mkdocs build --strict --site-dir site

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: $(STAMP) ## Rewrite requirements.lock from the current .venv
	{ head -n 2 requirements.lock; echo "setuptools==$$($(PY) -c 'import setuptools; print(setuptools.__version__)')"; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -vxFf <(grep -E '^[A-Za-z0-9_.-]+==' requirements-extras.lock); \
	} > requirements.lock.new && mv requirements.lock.new requirements.lock

clean: ## Remove caches and run outputs (keeps .venv and mlflow.db)
	rm -rf .pytest_cache .ruff_cache outputs multirun site

.PHONY: help install train ui explain bench test test-slow test-gpu lint docs format lock clean

# --------------------------------------------------------------------------- Docker
IMAGE       ?= bp-service:latest
DOCKERFILE  ?= docker/Dockerfile
DOCKER_ARGS ?=
BUILD_ARGS  ?=
OFFLINE     ?=
HOST_NETWORK ?=
# compose v2; HOST_NETWORK=1 adds docker/compose.host.yaml (every service on the host network, on 127.0.0.1)
COMPOSE      = docker compose -f docker/compose.yaml $(if $(HOST_NETWORK),-f docker/compose.host.yaml)
BP_PREDICT_INPUT ?= docker/input.csv

docker-build: ## Build the image (OFFLINE=1: only from docker/wheelhouse/; GPU: DOCKERFILE=docker/Dockerfile.cuda IMAGE=bp-service:cuda)
	docker build -f $(DOCKERFILE) $(if $(OFFLINE),--build-arg OFFLINE=1) $(BUILD_ARGS) -t $(IMAGE) .

docker-train: docker-build ## Train experiment=digits in the image; runs and checkpoints on the bp-data volume (GPU: DOCKER_ARGS=--gpus=all)
	docker run --rm $(DOCKER_ARGS) -v bp-data:/data $(IMAGE) bp-train experiment=digits trainer.enable_progress_bar=false $(ARGS)

wheelhouse: $(STAMP) ## Download every wheel of the lock (torch's CPU build) into docker/wheelhouse/ for OFFLINE=1 builds
	bash docker/wheelhouse.sh $(PY) docker/wheelhouse

docker-check: $(STAMP) ## Build the image offline and run the container checks CI runs (docker/ci-check.sh)
	bash docker/ci-check.sh

$(BP_PREDICT_INPUT): | $(STAMP)
	$(PY) -c 'import pandas as pd; from sklearn.datasets import load_digits; d = load_digits(); \
	  f = pd.DataFrame(d.data, columns=d.feature_names); f.insert(0, "id", range(len(f))); f.to_csv("$@", index=False)'

compose-up: $(BP_PREDICT_INPUT) ## PostgreSQL + MLflow (http://127.0.0.1:5000), then train, then predict on BP_PREDICT_INPUT
	BP_PREDICT_INPUT=$(abspath $(BP_PREDICT_INPUT)) $(COMPOSE) up --build $(ARGS)

compose-down: ## Stop the compose stack; its volumes (database, runs, models, predictions) stay unless ARGS=-v
	$(COMPOSE) down $(ARGS)

.PHONY: docker-build docker-train wheelhouse docker-check compose-up compose-down

# --------------------------------------------------------------------------- CUDA machine without internet
GPU_WHEELS ?= .gpu-wheels

gpu-wheels: $(STAMP) ## Download the wheels a CUDA machine without internet lacks (the lock minus torch, Lightning, numpy...) into .gpu-wheels
	PY=$(PY) tools/gpu-wheels.sh $(GPU_WHEELS) $(or $(GPU_PYTHON_VERSION),3.12)

gpu-check: ## On a CUDA machine: install from .gpu-wheels, make test-gpu, bp-bench CUDA rows, bp-train synthetic per precision; results in $OUT
	WHEELS=$(abspath $(GPU_WHEELS)) bash tools/gpu-check.sh $(or $(OUT_DIR),$(OUT),gpu-check-out)

.PHONY: gpu-wheels gpu-check
