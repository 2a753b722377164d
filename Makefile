# Everyday targets. `make demo` and `make test` are the README's two set-up commands.
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# The server keeps concurrency leases on disk (PREFECT_HOME), not in memory: a restart then forgets no slot holder,
# and a slot whose holder died is freed when its lease expires (60 s), so the device limit cannot leak.
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE ?= prefect.server.concurrency.lease_storage.filesystem

.PHONY: install demo test test-all test-gpu gpu-check gpu-check-dry lint format bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install  ## a real generation through Prefect on the embedded tiny model
	$(VENV)/bin/stagediff generate --prompt "a dog" --prompt "a cat" --steps 2 --height 64 --width 64 \
		--seed 7 --max-sequence-length 32 --batch-size 2 --out outputs --run-id demo

SERVER_TESTS := tests/test_deployments.py tests/test_pool.py tests/test_slots.py tests/test_speed.py

test: install  ## the CPU test suite (what CI runs)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Two pytest processes side by side: the deployment, pool and slot tests point their process' Prefect client
	# at servers of their own and mostly wait on those servers, workers and flow runs (the speed-lever tests,
	# which compile, fill that wait). Their output follows.
	@$(VENV)/bin/pytest -q --durations=10 -p no:cacheprovider $(SERVER_TESTS) > .server-tests.log 2>&1 & \
	servers=$$!; \
	$(VENV)/bin/pytest -q --durations=10 $(SERVER_TESTS:%=--ignore=%); rest=$$?; \
	wait $$servers; code=$$?; echo "--- $(SERVER_TESTS):"; cat .server-tests.log; rm -f .server-tests.log; \
	[ $$rest -eq 0 ] && [ $$code -eq 0 ]

test-all: install  ## also the opt-in slow tests (and the GPU tests, which skip without CUDA)
	$(VENV)/bin/pytest -q -m "slow or not slow"

test-gpu: install  ## the placement tests that need CUDA
	$(VENV)/bin/pytest -q -m gpu

gpu-check: install  ## on a CUDA machine: gpu tests, stage peak memory, images/s vs diffusers -> bench/results/gpu.json
	$(PY) -m bench.gpu_check

gpu-check-dry: install  ## the same steps on the CPU and the tiny model (checks the script) -> gpu-dryrun.json
	$(PY) -m bench.gpu_check --dry-run

lint:
	$(VENV)/bin/ruff check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf outputs .pytest_cache

# Deployments (docs/deployments.md): `make server` in one terminal; `make deploy` and `make worker` in
# others, with PREFECT_API_URL=http://127.0.0.1:4200/api exported (or the PORT given to `make server`).
.PHONY: server deploy worker
POOL ?= stagediff-process
DEVICE ?= local
PORT ?= 4200
LIMIT ?= 1
AUTOMATION := deploy/crash-zombie-flow-runs.json

server: install  ## a local Prefect server (API and UI) on http://127.0.0.1:$(PORT)
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PORT)

deploy: install  ## the work pool, the device limit, the crashed-run automation and every deployment in prefect.yaml
	$(VENV)/bin/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || $(VENV)/bin/prefect work-pool create $(POOL) --type process
	$(VENV)/bin/prefect work-queue inspect control --pool $(POOL) >/dev/null 2>&1 || \
		$(VENV)/bin/prefect work-queue create control --pool $(POOL)
	$(VENV)/bin/prefect concurrency-limit create device:$(DEVICE) 1
	# The automation is created once: asked of the API by its exact name (exit 3: none yet; any other failure stops).
	$(PY) -c 'import json, sys; from prefect.client.orchestration import get_client; \
		client = get_client(sync_client=True).__enter__(); \
		sys.exit(0 if client.read_automations_by_name(json.load(open("$(AUTOMATION)"))["name"]) else 3)'; \
	status=$$?; if [ $$status -eq 3 ]; then $(VENV)/bin/prefect automation create --from-file $(AUTOMATION); \
	else exit $$status; fi
	PWD=$(CURDIR) $(VENV)/bin/prefect --no-prompt deploy --all

# Two workers: one for the `default` queue that runs at most LIMIT flow runs at a time (stages, replicas), and one
# for the `control` queue (fan-out parents, which only wait on their replicas: no limit). Heartbeats every 30 s.
worker: install  ## the pool's workers on this machine: LIMIT (1) flow runs at a time, and fan-out parents
	@export STAGEDIFF_DEVICE=$(DEVICE) PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30; \
	$(VENV)/bin/prefect worker start --pool $(POOL) --type process --work-queue control & control=$$!; \
	trap 'kill $$control 2>/dev/null' EXIT INT TERM; \
	$(VENV)/bin/prefect worker start --pool $(POOL) --type process --work-queue default --limit $(LIMIT)
