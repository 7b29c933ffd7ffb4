# Two commands on a fresh machine: `make run` (the pipeline once, on the defaults) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
RUN_ARGS ?=
# make serve DB=postgres: the Prefect server on PostgreSQL (a local cluster unless PREFECT_API_DATABASE_CONNECTION_URL is set)
DB ?= sqlite
# make serve TOPOLOGY=ha: Redis, two API replicas behind HAProxy, the services apart, every process restarted by supervisord (PostgreSQL implied;
# docs/scaling.md). The default, single, is one server process.
TOPOLOGY ?= single

# Telemetry cannot reach out from an offline machine; keep TensorFlow's C++ banner out of logs.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 2
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: docs run test test-quick test-shuffled venv lock clean serve stop bench bench-quick bench-strong bench-stores bench-near-copies soak bench-memory profile browser ha-tools torch-cpu gpu-check gpu-check-bundle

venv: $(STAMP)

# Installs are pinned: every package at the version in requirements.lock, checked against its hashes, then this
# project itself without resolving anything. uv installs them (its own pinned, hashed copy first, through pip):
# the same checks as pip's --require-hashes, downloads in parallel, a fresh venv in about a minute instead of three;
# --compile-bytecode writes the .pyc files at install, not in the first test processes that import TensorFlow. `make lock` refreshes the lock after pyproject.toml changed
# (tests/test_lock.py fails until then).
LOCK := requirements.lock
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	awk '/^uv==/ {p = 1} p {print} p && !/\\$$/ {exit}' $(LOCK) > $(VENV)/uv-requirement.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(VENV)/uv-requirement.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --require-hashes --no-deps --compile-bytecode -r $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(MAKE) --no-print-directory torch-cpu
	touch $(STAMP)

# The lock: pyproject.toml's ranges (with the dev extras) resolved for Python 3.11 on x86-64 Linux, each package
# kept at the version this venv has (what the suite passed with) unless the ranges exclude it; hashes of every file.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^torch==' > .lock-constraints.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --generate-hashes --no-header -c .lock-constraints.txt -o $(LOCK) --quiet
	sed -i '/^    #   -c .lock-constraints.txt$$/d' $(LOCK)
	rm -f .lock-constraints.txt

# PyTorch for the torch backend's tests, CPU build (about 190 MB, not PyPI's multi-GB CUDA build): a wheel kept in
# $(TORCH_WHEELS) when this machine has one, else PyTorch's CPU index. Skipped when torch is already installed.
TORCH_WHEELS    ?= /opt/wheels
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
torch-cpu:
	@$(BIN)/python -c "import torch" 2>/dev/null || { \
	  tag=$$($(BIN)/python -c 'import sys; print("cp%d%d" % sys.version_info[:2])'); \
	  wheel=$$(ls $(TORCH_WHEELS)/torch-*+cpu-$$tag-*.whl 2>/dev/null | tail -1); \
	  if [ -n "$$wheel" ]; then $(BIN)/python -m pip install --quiet --disable-pip-version-check "$$wheel"; \
	  else $(BIN)/python -m pip install --quiet --disable-pip-version-check torch --index-url $(TORCH_CPU_INDEX); fi; }

run: $(STAMP)
	$(BIN)/mnist-pipeline run $(RUN_ARGS)

# Three pytest workers (pytest-xdist) on two cores: the deployment tests hold one worker mostly waiting (a server
# starting, heartbeats missed, runs in the stack's own processes) while the others keep both cores busy. Four were
# measured too (2026-12-06): 7:37 to 9:34 of pytest against 8:00 to 8:55 on three; the long modules then all start
# at once and each runs slower (the backend tests twice as long). Modules
# that share a server stack or trained models stay on one worker (--dist loadgroup, scheduled by
# tests/conftest.py's SHARED_WORKER: xdist_group is ignored under pytest 9.2);
# --no-loadscope-reorder keeps the collection order (long modules first) instead of xdist's largest-group-first.
# One thread per worker for NumPy's BLAS, TensorFlow's kernels and PyTorch: by default each worker starts a
# thread per core, and three workers' threads spin-waiting for each other on two cores burned a third of the
# suite's CPU (2026-12-07, the CPU-bound label-cap, poison, training-set, caching and night-bound modules on three
# workers: 4 min 36 s of pytest and 535 s of CPU with the defaults, 2 min 57 s and 345 s with one thread each).
TEST_THREADS = OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=2
TEST_WORKERS ?= 3
PYTEST_ARGS ?=
test: $(STAMP) browser ha-tools
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

# The inner loop: no training, no Prefect server, no npm download (about a minute). See docs/development.md.
test-quick: $(STAMP)
	$(BIN)/ruff check .
	$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not network" $(PYTEST_ARGS)

# The whole suite in a random order (pytest-randomly; it prints "Using --randomly-seed=N", and
# `make test-shuffled PYTEST_ARGS=--randomly-seed=N` repeats that order). make test keeps a fixed order.
test-shuffled: $(STAMP) browser
	$(TEST_THREADS) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -p randomly $(PYTEST_ARGS)

# The UI test drives Debian's chromium through Playwright (Playwright's own browser download needs the open web).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } || \
	  { echo "make test needs chromium for the UI test: install Debian's chromium package (apt-get install chromium)"; exit 1; }

# The HA topology's Redis and load balancer, from Debian (tests/test_ha.py starts that stack).
ha-tools:
	@{ command -v redis-server && { command -v haproxy || test -x /usr/sbin/haproxy; }; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server haproxy >/dev/null); } || \
	  { echo "make test and make serve TOPOLOGY=ha need Redis and HAProxy: install Debian's redis-server and haproxy packages (apt-get install redis-server haproxy)"; exit 1; }

# make serve HOST=0.0.0.0: workers on other machines may connect (the API is authenticated either way). Only a HOST
# given on make's command line counts: shells such as zsh set HOST to the machine's name.
SERVE_HOST := $(if $(filter command line,$(origin HOST)),$(HOST),127.0.0.1)
serve: $(STAMP) $(if $(filter ha,$(TOPOLOGY)),ha-tools)
	$(BIN)/mnist-pipeline serve start --db $(DB) --host $(SERVE_HOST) --topology $(TOPOLOGY)

stop:
	$(BIN)/mnist-pipeline serve stop

# The documentation site from docs/ (mkdocs.yml), served with live reload; make test builds it with --strict.
docs: $(STAMP)
	$(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/python bench/bench.py --epochs 15

bench-quick: $(STAMP)
	$(BIN)/python bench/bench.py --epochs 2

bench-strong: $(STAMP)  # the strong model on its defaults, seeds 0, 1 and 2 (about 2 hours on 2 cores without bf16)
	$(BIN)/python bench/strong.py --views

profile: $(STAMP)
	$(BIN)/python bench/profile_step.py

bench-stores: $(STAMP)
	$(BIN)/python bench/stores.py

bench-memory: $(STAMP)  # peak RSS of a 1-epoch training at 60 000 and 240 000 images (docs/scaling.md)
	$(BIN)/python bench/training_memory.py --sizes 60000 240000

# A year of nights through the real flow (bench/soak.py: 36 nights of 10 days' arrivals each, about an hour on 2
# cores): per night its steps' times, peak RSS, training-set and holdout sizes, store size; a plot and JSON lines in
# bench-results/. SOAK_ARGS='--nights 8' for a shorter one.
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# The leakage check's catch rate per transform and its false positives on every clean training image (about 15 min on
# 2 cores); writes docs/measured/near-copies.json, which docs/new-data.md renders.
bench-near-copies: $(STAMP)
	$(BIN)/python bench/near_copies.py

# The GPU check: `make gpu-check-bundle` here (network: wheels for a GPU machine's Python 3.12, MNIST's IDX files),
# then `make gpu-check` (or `bash bench/gpu_check.sh`) there. See README "Performance".
gpu-check-bundle: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
	  --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $$($(BIN)/python bench/gpu_check.py --wheel-list)
	$(BIN)/python bench/gpu_check.py --export-mnist .mnist
	@du -sh .whl .mnist

gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
