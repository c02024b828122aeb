# Lookback — two commands for a new user: `make serve` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test check lint docs bench silero system-deps train train-wake train-wake2 clean protocol

install: $(STAMP)

# Idempotent: re-runs pip only when pyproject.toml changed (the stamp carries its checksum).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

serve: install
	$(BIN)/lookback serve --host $(HOST) --port $(PORT)

# Debian tools some tests drive (headless Chromium, promtool, espeak-ng/sox, and the real
# redis-server, nginx and mosquitto that fixtures start on free loopback ports). Installed
# when missing and we are root; the tests that need them fail loudly if they are absent.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium fonts-dejavu-core"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v sox >/dev/null || missing="$$missing sox"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null || missing="$$missing nginx"; \
	{ command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null || missing="$$missing mosquitto"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "WARNING: apt-get install$$missing failed; tests that need them will fail"; \
	  else echo "WARNING: missing$$missing (install them with apt-get); tests that need them will fail"; fi; \
	fi

# Silero VAD 6.2.3 from its PyPI wheel (hash-checked); the parity tests need it.
silero: install
	$(BIN)/lookback models import silero-vad

test: install system-deps silero
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Tests are linted and type-checked too (pyproject relaxes annotations for them).
LINTED := service tests model_store/recipes
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# The inner loop: lint and the fast tests. No apt, no browser, no deployment tools, no
# download: Silero's tests run only when it is already imported (`make silero`).
SILERO_PRESENT := $(wildcard model_store/silero-vad/*/silero_vad.onnx)
CHECK_MARKS := not slow$(if $(SILERO_PRESENT),, and not silero)
check: lint
	$(BIN)/python -m pytest -q -m "$(CHECK_MARKS)" $(PYTEST_ARGS)

# The reference tables of docs/ (errors, configuration, metrics) from the code.
docs: install
	$(BIN)/lookback docs --write

bench: install silero
	$(BIN)/python -m tests.bench.ab_bench
	$(BIN)/python -m tests.bench.inproc_bench --json tests/bench/results/$$(date +%F-%H%M)-inproc.json
	$(BIN)/python -m tests.bench.run_all
	$(BIN)/python -m tests.bench.export_bench
	$(BIN)/python -m tests.bench.sessions_bench --trials 20 --sessions 1000
	$(BIN)/python -m tests.bench.workers_bench
	$(BIN)/python -m tests.bench.resample_bench --out tests/bench/results/$$(date +%F-%H%M)-resample.md
	$(BIN)/python -m tests.bench.kafka_bench --json tests/bench/results/$$(date +%F-%H%M)-kafka.json

protocol: install
	$(BIN)/lookback protocol

# Retrain the shipped default model (needs the train extra, espeak-ng and sox).
train: install system-deps
	$(BIN)/python -m pip install -q -e '.[train]'
	bash model_store/recipes/run.sh

# Retrain the wake-phrase model lookback-wake (same needs; under 20 minutes on 2 CPU cores).
train-wake: install system-deps
	$(BIN)/python -m pip install -q -e '.[train]'
	bash model_store/recipes/wake/run.sh

# Retrain lookback-wake/2 (also needs Flite, Festival and its voices; under 30 minutes on 2 CPU
# cores, the synthesised pools are kept in model_store/recipes/data/wake2 for the next run).
WAKE2_APT := flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts festvox-italp16k \
	festvox-czech-dita festvox-suopuhe-lj
train-wake2: install system-deps
	@command -v flite >/dev/null && test -d /usr/share/festival/voices/english/ked_diphone \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(WAKE2_APT))
	$(BIN)/python -m pip install -q -e '.[train]'
	bash model_store/recipes/wake2/run.sh

# Containers (need a Docker engine) and offline validation of the deployment files.
IMAGE ?= lookback
.PHONY: docker docker-cpu compose compose-cpu k8s-render deploy-check
docker:
	docker build -t $(IMAGE):gpu .
docker-cpu:
	docker build --target cpu -t $(IMAGE):cpu .
compose:
	docker compose -f docker/compose.yaml up --build
compose-cpu:
	docker compose -f docker/compose.yaml --profile cpu up --build lookback-cpu prometheus grafana
k8s-render:
	kubectl kustomize docker/k8s
deploy-check: install system-deps silero
	$(BIN)/python -m pytest -q tests/deploy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
