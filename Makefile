# Two commands do everything on a fresh machine (Python 3.11 + Java 17):
#   make demo   - create .venv and run the whole flow on the embedded default
#   make test   - create .venv and run the full test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := embedded,hf,redis,dev

.PHONY: demo test venv redis bench clean

$(VENV)/.installed: setup.py constraints-cpu.txt spark_jobs/log4j2.properties
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-cpu.txt --config-settings editable_mode=compat -e ".[$(EXTRAS)]"
	# Spark's console log at WARN: spark-submit and the jobs print progress, not INFO lines
	conf=$$($(PY) -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "conf"))') && \
	  mkdir -p "$$conf" && cp spark_jobs/log4j2.properties "$$conf/"
	touch $@

venv: $(VENV)/.installed

# The production online store in tests is a real redis-server (Debian package).
redis:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: venv
	$(PY) -m spark_jobs.demo

test: venv redis
	$(PY) -m pytest -q --durations=15 tests

# Benchmarks print their figures and ratios (docs/PERFORMANCE.md); rank_latency needs `make demo`
# first; materialize_scale takes about an hour on 2 cores (200k and 2M rows into redis-server).
bench: venv redis
	$(PY) bench/annotate_throughput.py
	$(PY) bench/rank_latency.py
	$(PY) bench/materialize_scale.py

clean:
	rm -rf artifacts feature_repo/data spark-warehouse
