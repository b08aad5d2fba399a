"""GPU readiness in one go: the device-marked tests, then every benchmark's table on CUDA.

On a CUDA machine: ``pytest -m cuda`` (``tests/test_cuda.py``: spectra, penalty gradients
and a lazy MAP fit on CUDA equal the CPU ones; the skipped calls of a lazy ``Regularizer``
make no host sync, checked with ``torch.cuda.set_sync_debug_mode("error")``), then each
benchmark with its quick settings, ``--device cuda`` where it has the flag (the others run
as they are and say so), each under a time limit, so the whole check takes a few minutes.
Without CUDA it prints one line and exits 0. The exit status is that of the tests.

Run: ``PYTHONPATH=. python benchmarks/gpu_check.py [--limit 240] [--skip-benchmarks]``; on the
lent machine, ``benchmarks/device_run.sh`` does the set-up (``make device-wheels`` here), this
check and the test suite in one call.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: benchmark -> its quick arguments (``--device cuda`` is added where ``--help`` lists it)
BENCHMARKS = {
    "bench_penalties.py": ["--quick"],
    "bench_infer.py": ["--quick", "--no-models"],  # its five small models stay on the CPU
    "bench_spectrum.py": ["--quick"],
    "bench_tracking.py": ["--repeats", "3"],
    "bench_distributed.py": ["--steps", "3", "--epochs", "1", "--repeats", "1"],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _has_device_flag(script: str) -> bool:
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)
    return "--device" in out.stdout


def cuda_test_files() -> list[str]:
    """The test files that hold a ``cuda``-marked test (only these are collected, so a
    test-only package missing on the device machine cannot stop the device tests)."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.startswith("test_") and name.endswith(".py"):
                with open(path, encoding="utf-8") as fh:
                    if "pytest.mark.cuda" in fh.read():
                        found.append(os.path.relpath(path, ROOT))
    return sorted(found)


def run_tests(limit: float) -> int:
    """``pytest -m cuda`` over the files that hold device tests; returns its exit status."""
    files = cuda_test_files()
    print(f"== pytest -m cuda {' '.join(files)}", flush=True)
    try:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda",
                               "-p", "no:cacheprovider", *files],
                              cwd=ROOT, env=_env(), timeout=limit).returncode
    except subprocess.TimeoutExpired:
        print(f"pytest -m cuda: over {limit:.0f} s", flush=True)
        return 1


def run_benchmark(name: str, args: list[str], limit: float) -> None:
    """One benchmark on CUDA (when it takes ``--device``), its table printed as it runs."""
    script = os.path.join(HERE, name)
    argv = list(args)
    if _has_device_flag(script):
        argv += ["--device", "cuda"]
        where = "CUDA"
    else:
        where = "its default device (no --device flag)"
    print(f"\n== {name} {' '.join(argv)}  [{where}]", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=_env(),
                            timeout=limit).returncode
    except subprocess.TimeoutExpired:
        print(f"{name}: stopped after {limit:.0f} s (table above is partial)", flush=True)
        return
    print(f"{name}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=240.0, help="seconds per benchmark")
    ap.add_argument("--skip-benchmarks", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated benchmark files to run")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: CUDA is unavailable (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda}); nothing to check on this machine")
        return 0
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}", flush=True)
    rc = run_tests(limit=args.limit)
    if not args.skip_benchmarks:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        for name, bench_args in BENCHMARKS.items():
            if not only or name in only:
                run_benchmark(name, bench_args, args.limit)
    print(f"\ngpu_check: device tests {'passed' if rc == 0 else f'FAILED (exit {rc})'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
