"""Checkpoint rows of ``bench_spectrum.py``: a synthetic sharded checkpoint analysed from
its folder by ``bs.analyze`` and by WeightWatcher, each in a fresh process (time, peak RSS),
on an idle and on a loaded machine (one busy process per core)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def llama_shapes(layers: int, d: int, f: int, vocab: int) -> dict[str, tuple[int, int]]:
    """LLaMA naming: embed_tokens, per layer q/k/v/o (d x d), gate/up (f x d), down (d x f),
    norms, untied lm_head."""
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
        shapes[p + "input_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (vocab, d)
    return shapes


def write_checkpoint(folder: Path, shapes: dict, shard_bytes: int) -> tuple[int, int]:
    """Heavy-tailed float32 tensors in shards of about ``shard_bytes`` with an index,
    written one shard at a time; returns (total bytes, largest tensor bytes)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shard, size, n, weight_map = {}, 0, 0, {}
    total = largest = 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n + 1:05d}.safetensors"
            save_file(shard, str(folder / name))
            weight_map.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1

    for key, shape in shapes.items():
        t = torch.randn(*shape, generator=g) / torch.rand(*shape, generator=g).add_(0.05)
        t = t.mul_(0.02 / (shape[-1] ** 0.5))
        shard[key] = t
        size += t.numel() * 4
        total += t.numel() * 4
        largest = max(largest, t.numel() * 4)
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total, largest


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would keep the parent's peak
    across fork + exec)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(who: str, path: str, threads: str) -> None:
    """Run one analysis in this fresh process; print a JSON line."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    import bayes_spectral as bs

    base = peak_rss_mb()
    t0 = time.perf_counter()
    if who == "ours":
        ds = bs.analyze(path, threads=None if threads == "auto" else int(threads),
                        progress=False)
        rows = ds.sizes["layer"]
        used = ds.attrs["threads"]
    else:
        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        if threads != "auto":
            torch.set_num_threads(int(threads))
        rows = len(ww.WeightWatcher(model=path).analyze())
        used = torch.get_num_threads()
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "import_mb": base, "rows": rows,
                      "threads": used}))


def _run_child(who: str, path: Path, threads: str) -> dict:
    """One analysis in a fresh process; ``threads`` "1" also sets ``OMP_NUM_THREADS=1`` (the
    BLAS threads of numpy/scipy, which WeightWatcher's SVDs use)."""
    script = Path(__file__).with_name("bench_spectrum.py")
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if threads == "1" else {}))
    res = subprocess.run([sys.executable, str(script), "--child", who, str(path), threads],
                         capture_output=True, text=True, timeout=3600, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        raise RuntimeError(f"{who} child failed: {res.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def checkpoint_rows(quick: bool, layers: int | None, skip_ww: bool = False,
                    no_load: bool = False) -> None:
    d, f, vocab = (512, 1408, 8000) if quick else (1024, 2816, 32000)
    layers = layers or (4 if quick else 32)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        folder = Path(tmp)
        total, largest = write_checkpoint(folder, llama_shapes(layers, d, f, vocab),
                                          shard_bytes=(64 if quick else 512) * 2**20)
        print(f"== analyze(folder): synthetic LLaMA-shaped checkpoint, {layers} layers, "
              f"d={d}, ff={f}, vocab={vocab}: {total / 2**30:.2f} GiB float32 in "
              f"{len(list(folder.glob('*.safetensors')))} shards; largest tensor "
              f"{largest / 2**20:.0f} MiB; {cores} cores")
        target = 1024 + 4 * largest / 2**20
        print(f"{'case':<34}{'rows':>6}{'threads':>8}{'time [s]':>10}{'peak RSS [MiB]':>16}"
              f"{'after import':>14}{'peak/target':>13}")
        results = {}
        for case, who, threads, load in [
                ("ours, idle", "ours", "auto", 0), ("WeightWatcher, idle", "ww", "auto", 0),
                ("ours, loaded, torch default", "ours", str(torch.get_num_threads()), cores),
                ("ours, loaded, default_threads()", "ours", "auto", cores),
                ("WeightWatcher, loaded", "ww", "auto", cores),
                ("WeightWatcher, loaded, 1 thread", "ww", "1", cores)]:
            if (who == "ww" and skip_ww) or (load and no_load):
                continue
            busy = _busy(load)
            try:
                time.sleep(0.5 if load else 0)
                r = _run_child(who, folder, threads)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
            results[case] = r
            print(f"{case:<34}{r['rows']:>6}{r['threads']:>8}{r['seconds']:>10.2f}"
                  f"{r['peak_mb']:>16.0f}{r['import_mb']:>14.0f}{r['peak_mb'] / target:>13.2f}")
        if not (skip_ww or no_load):
            idle = results["WeightWatcher, idle"]["seconds"] / results["ours, idle"]["seconds"]
            loaded = (results["WeightWatcher, loaded"]["seconds"]
                      / results["ours, loaded, default_threads()"]["seconds"])
            print(f"ww/ours: idle {idle:.2f}, loaded {loaded:.2f}")
        if not no_load:
            collapse = (results["ours, loaded, torch default"]["seconds"]
                        / results["ours, loaded, default_threads()"]["seconds"])
            print(f"loaded: torch default threads / default_threads() = {collapse:.2f}")
        print(f"target peak = 1 GiB + 4 x largest = {target:.0f} MiB\n")
