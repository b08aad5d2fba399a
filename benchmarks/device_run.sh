#!/bin/bash
# The whole GPU check of a session lent a CUDA machine, in one call (benchmarks/gpu_check.py,
# then the test suite there). Here first: `make device-wheels` (the pure-Python packages that
# machine lacks, as wheels in .whl/); then run this script there with `.whl` carried. Writes
# env.txt, gpu_check.log and suite.log under $OUT (default: ./device-out).
# Limits (seconds): GPU_LIMIT for gpu_check, BENCH_LIMIT per benchmark, SUITE_LIMIT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-device-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site
fi
# editable, as `make` installs it: bayes_spectral.models resolves, the CLI runs as a module
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || echo "editable install failed: the CLI subprocess tests will fail" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/env.txt"
python3 -c "import os, sys, torch, pyro, arviz, numpy, scipy, bayes_spectral
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'pyro', pyro.__version__, 'arviz', arviz.__version__, 'numpy', numpy.__version__,
      'scipy', scipy.__version__, 'cores', os.cpu_count())" 2>&1 | tee -a "$OUT/env.txt"
timeout -s KILL "${GPU_LIMIT:-360}" python3 benchmarks/gpu_check.py --limit "${BENCH_LIMIT:-75}" \
  --only bench_penalties.py,bench_infer.py,bench_spectrum.py > "$OUT/gpu_check.log" 2>&1
echo "gpu_check rc=$?" >> "$OUT/gpu_check.log"
# no pipe here: pytest-xdist workers would hold it open past the timeout
timeout -s KILL "${SUITE_LIMIT:-200}" python3 -m pytest -q -rf -n 14 -p no:cacheprovider \
  --timeout 120 -m "not cuda and not slow" tests > "$OUT/suite.log" 2>&1
echo "suite rc=$?" >> "$OUT/suite.log"
grep -E "passed|failed|rc=" "$OUT/gpu_check.log" "$OUT/suite.log" | tail -8
