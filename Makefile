# Two entry points for a fresh clone:
#   make demo   set up .venv and run the main job (offline, any machine)
#   make test   set up .venv and run the test suite
# On a machine with a CUDA GPU, set TORCH="torch" (or your CUDA build) to keep the GPU build of PyTorch.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
DEMO_DIR ?= psa-demo

.PHONY: setup demo test selfcheck bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,plots]"
	touch $@

demo: setup
	$(VENV)/bin/psa-diffusers demo --output $(DEMO_DIR)

selfcheck: setup
	$(PY) benchmarks/selfcheck.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
