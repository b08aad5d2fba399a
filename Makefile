# Two commands do everything on a fresh machine with Python >= 3.10 and pip:
#   make run    -> the main job: bayes-spectral compare (every penalty and prior, report/)
#   make test   -> ruff + the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint bench clean results claims device-wheels test-long

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

# the issue-size SG-MCMC check (32000 draws on digits: about 30 min of one core; not in CI)
test-long: $(VENV)/.installed
	BAYES_SPECTRAL_LONG=1 $(PY) -m pytest -q -ra tests/bnn/test_sampler_digits.py

bench: $(VENV)/.installed
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

# the reference models at full size (about 1.5 h of one core) -> results/, then the claims
MODELS := low_rank_weight_decay diagonal_weight_norm deep_matrix_factorization heavy_tailed \
          spectral_norm heavy_tailed_posterior
results: $(VENV)/.installed
	for m in $(MODELS); do $(VENV)/bin/bayes-spectral reproduce $$m --out results/$$m || exit 1; done
	$(VENV)/bin/bayes-spectral reproduce heavy_tailed --config paper --out results/heavy_tailed_paper
	$(MAKE) claims

# the README's claims table and results/claims.md from results/*/NAME_summary.json
claims: $(VENV)/.installed
	$(PY) -c "from bayes_spectral.apps.claims import update_readme as u; u('README.md', 'results')"
	$(VENV)/bin/bayes-spectral claims --from results --detail --out results/claims.md

# the pure-Python packages the lent CUDA machine (Python 3.12, no registry) lacks, as wheels
# for benchmarks/device_run.sh (carry .whl)
DEVICE_WHEELS := arviz==0.23.4 pyro-ppl==1.9.2 pyro-api==0.1.2 xarray-einstats==0.9.1 \
                 h5netcdf==1.8.2 mnist1d==0.0.2.post1 powerlaw==2.0.0 weightwatcher==0.7.7 \
                 platformdirs matplotlib-inline
device-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(DEVICE_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info
