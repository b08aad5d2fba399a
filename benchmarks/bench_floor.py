"""Floor rows of ``bench_spectrum.py`` (``--only floor``): ``bs.analyze`` per matrix against
a bare float64 ``eigvalsh`` of each matrix's smaller Gram matrix (timed in the same run),
on a GPT-2-sized stack of blocks (per block q, k, v, o 768x768, up 3072x768, down
768x3072), batched (equal shapes in one ``eigvalsh``) and one matrix at a time, then what
the per-matrix work costs: cast, Gram product, ``eigvalsh``, power-law fit and metrics.
Single-threaded (the machine is shared); ``--device cuda`` adds the GPU row when there.
Then, per matrix shape, ``gram_dtype=torch.float32`` (:func:`gram_dtype_rows`): float64
Gram + ``eigvalsh`` (the floor), float32 Gram upcast + float64 ``eigvalsh``, and analyze
with either, each over the bare ``eigvalsh`` of the float64 Gram matrix.
``python benchmarks/bench_floor.py --quick`` runs both tables alone (as ``bench_spectrum.py
--only floor`` does)."""

from __future__ import annotations

import math
import time
import warnings

import torch

import bayes_spectral as bs
from bayes_spectral.spectra.metrics import metrics_from_esd


def blocks(n_blocks: int, d: int) -> dict[str, torch.Tensor]:
    """Heavy-tailed float32 weights in Hugging Face-like names."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in range(n_blocks):
        for name, shape in [("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)),
                            ("up", (4 * d, d)), ("down", (d, 4 * d))]:
            w = torch.randn(*shape, generator=g) / torch.rand(*shape, generator=g).add(0.05)
            out[f"h.{b}.{name}.weight"] = (w * 0.02 / math.sqrt(d)).contiguous()
    return out


def best(fn, repeat: int) -> float:
    best_t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best_t = min(best_t, time.perf_counter() - t0)
    return best_t


def _grams(sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for w in sd.values():
        w = w.double()
        out.append(w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T)
    return out


def _gram_eig(sd):
    for w in sd.values():
        w = w.double()
        torch.linalg.eigvalsh(w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T)


def _fits(sd, evals):
    for w, ev in zip(sd.values(), evals, strict=True):
        metrics_from_esd(ev, max_dim=max(w.shape),
                         rank_rtol=math.sqrt(max(w.shape) * torch.finfo(ev.dtype).eps))


GROUPS = [("all 6 per block", None), ("q, k, v, o 768x768", r"h\.\d+\.(q|k|v|o)"),
          ("up, down 768x3072", r"h\.\d+\.(up|down)")]


def _group_times(sd, pattern, repeat: int, device: str) -> dict[str, float]:
    """Seconds of each step over the matrices matching ``pattern`` (all for ``None``)."""
    import re

    sub = {k: v for k, v in sd.items()
           if pattern is None or re.fullmatch(pattern, k.removesuffix(".weight"))}
    grams = _grams(sub)
    evals = [torch.linalg.eigvalsh(g).clamp_min(0) for g in grams]
    out = {"n": len(sub),
           "eig": best(lambda: [torch.linalg.eigvalsh(g) for g in grams], repeat),
           "gram+eig": best(lambda: _gram_eig(sub), repeat),
           "fit": best(lambda: _fits(sub, evals), repeat),
           "one": best(lambda: bs.analyze(sub, batch=False, threads=1), repeat),
           "batched": best(lambda: bs.analyze(sub, threads=1), repeat)}
    if device == "cuda" and torch.cuda.is_available():
        bs.analyze(sub, device="cuda", threads=1)  # warm-up (CUDA context, kernels)
        out["cuda"] = best(lambda: (bs.analyze(sub, device="cuda", threads=1),
                                    torch.cuda.synchronize()), repeat)
    return out


def floor_rows(quick: bool, device: str = "cpu") -> None:
    """Print the ratio table (module docstring): each time over the bare ``eigvalsh``."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    n_blocks, repeat = (2, 2) if quick else (24, 2)
    sd = blocks(n_blocks, 768)
    print(f"\n== analyze per matrix over a bare float64 eigvalsh of its smaller Gram matrix "
          f"({n_blocks} blocks x 6 matrices, d=768, float32 weights; 1 thread)")
    cols = ["eig [ms]", "gram+eig", "fit+metrics", "one-by-one", "batched"]
    cols += ["cuda"] if device == "cuda" and torch.cuda.is_available() else []
    print(f"{'matrices':<22}" + "".join(f"{c:>13}" for c in cols))
    for name, pattern in GROUPS:
        t = _group_times(sd, pattern, repeat, device)
        ratios = [t[k] / t["eig"] for k in ("gram+eig", "fit", "one", "batched", "cuda")
                  if k in t]
        print(f"{name:<22}{1e3 * t['eig'] / t['n']:>13.1f}"
              + "".join(f"{r:>13.3f}" for r in ratios))
    gram_dtype_rows(quick)


def _gram(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = w.to(dtype)
    return w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T


SHAPES = [(768, 768), (3072, 768), (768, 3072)]


def _shape_times(mats: dict[str, torch.Tensor], repeat: int) -> dict[str, float]:
    """Seconds over ``mats`` (one shape) of each way to its spectrum."""
    grams = [_gram(w, torch.float64) for w in mats.values()]
    return {
        "eig": best(lambda: [torch.linalg.eigvalsh(g) for g in grams], repeat),
        "g64": best(lambda: [torch.linalg.eigvalsh(_gram(w, torch.float64))
                             for w in mats.values()], repeat),
        "g32": best(lambda: [torch.linalg.eigvalsh(_gram(w, torch.float32).double())
                             for w in mats.values()], repeat),
        "a64": best(lambda: bs.analyze(mats, threads=1), repeat),
        "a32": best(lambda: bs.analyze(mats, threads=1, gram_dtype=torch.float32), repeat),
    }


def gram_dtype_rows(quick: bool) -> None:
    """Per shape: each way's time over the bare float64 ``eigvalsh`` of the Gram matrix."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    n, repeat = (3, 2) if quick else (12, 3)
    print(f"\n== gram_dtype=float32: time over a bare float64 eigvalsh of the Gram matrix "
          f"({n} heavy-tailed float32 matrices per shape; 1 thread)")
    cols = ["eig [ms]", "f64 gram+eig", "f32 gram+eig", "analyze f64", "analyze f32"]
    print(f"{'shape':<12}" + "".join(f"{c:>14}" for c in cols))
    g = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        mats = {f"m{i}.weight": torch.randn(*shape, generator=g)
                / torch.rand(*shape, generator=g).add(0.05) for i in range(n)}
        t = _shape_times(mats, repeat)
        print(f"{'x'.join(map(str, shape)):<12}{1e3 * t['eig'] / n:>14.1f}"
              + "".join(f"{t[k] / t['eig']:>14.3f}" for k in ("g64", "g32", "a64", "a32")))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, 3 matrices a shape")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    floor_rows(args.quick, args.device)
