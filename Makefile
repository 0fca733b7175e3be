# Two entry points for a fresh clone:
#   make demo   set up .venv and run the main job (offline, any machine)
#   make test   set up .venv and run the test suite
# On a machine with a CUDA GPU, set TORCH="torch" (or your CUDA build) to keep the GPU build of PyTorch.
# The `interpret` extra brings triton for Triton's CPU interpreter (the kernel tests without CUDA);
# CUDA builds of torch bring triton themselves.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
DEMO_DIR ?= psa-demo

.PHONY: setup demo test selfcheck bench lint check-deps clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,plots,interpret]"
	touch $@

demo: setup
	$(VENV)/bin/psa-diffusers demo --output $(DEMO_DIR)

selfcheck: setup
	$(PY) benchmarks/selfcheck.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# No triton in a CPU install without extras, and the lower bounds of pyproject.toml resolve together
# (pip --dry-run in a throwaway venv; needs PyPI). CI runs it before `make test`.
check-deps:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" bash .ci/check_deps.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
