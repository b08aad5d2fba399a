# Two commands do everything on a fresh machine with Python >= 3.10 and pip:
#   make run    -> the main job: bayes-spectral compare (every penalty and prior, report/)
#   make test   -> ruff + the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull the CUDA stack.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/bayes-spectral compare --out report

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# notebooks run with their small settings (BAYES_SPECTRAL_SMALL=1) so none of them rots
test: lint
	BAYES_SPECTRAL_SMALL=1 $(PY) -m pytest -n 2 -q -ra --nbmake tests notebooks

bench: $(VENV)/.installed
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
