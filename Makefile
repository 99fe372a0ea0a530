# One entry point for people and CI. Everything lands in .venv; torch is pinned to the CPU wheel
# (an unpinned torch pulls gigabytes of CUDA packages).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench install clean broker

$(STAMP): pyproject.toml
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing Debian's mosquitto"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto mosquitto-clients; }
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/mqttfl demo

test: setup
	$(BIN)/python -m pytest -q -ra

# The broker-free tier: the protocol machines wired together in memory on virtual time (tests/pair) and the
# unit tests that need neither a broker nor agent processes. Under a minute on two cores.
FAST_TESTS := tests/pair tests/test_aggregate.py tests/test_backend.py tests/test_checkpoint.py tests/test_inbox.py \
	tests/test_chunking.py tests/test_configref.py tests/test_encoding.py tests/test_grouping.py tests/test_layers.py tests/test_links.py \
	tests/test_models.py tests/test_sim.py tests/test_shard.py tests/test_datatool.py tests/test_kept_models.py \
	tests/test_schedule.py tests/test_split.py tests/test_staleness.py tests/test_strategies.py tests/test_topics.py \
	tests/test_compress.py tests/test_fedlama.py tests/test_server_strategies.py tests/test_proximal.py tests/test_bench_comm.py \
	tests/test_pipeline_plan.py tests/test_split_plan.py tests/test_local_models.py tests/test_streaming.py tests/test_sites.py \
	tests/test_virtual_limits.py tests/test_journal.py tests/test_bench_cloudmem.py tests/test_weak_budget.py

test-fast: setup
	$(BIN)/python -m pytest -q -ra $(FAST_TESTS)

lint: setup
	$(BIN)/ruff check mqttfl device_agent edge_agent cloud_agent tests
	$(BIN)/mypy mqttfl device_agent edge_agent cloud_agent

bench: setup
	$(BIN)/mqttfl bench transport
	$(BIN)/mqttfl bench split

install: setup
	sh systemd/install.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
