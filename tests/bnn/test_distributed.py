"""Data-parallel fit (gloo, 2 CPU ranks) equals the single-process fit; resume across world
sizes; NaN guard on every rank; a raising rank stops the run; the torchrun entry point.

The 2-rank runs happen in subprocesses (``tests/bnn/_dist_worker.py`` through
``bayes_spectral.distributed.launch``, and ``torchrun``) with a subprocess timeout, so a hang
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pyro
import pytest
import torch

import bayes_spectral as bs
from bayes_spectral.distributed import GlobalBatchShards, likelihood_factor

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from _dist_worker import run_fit, setup  # noqa: E402

TOL = 1e-6  # float64; measured differences are ~1e-15


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _launch(tmp: pathlib.Path, jobs: list[dict], torchrun: bool, timeout: float = 120,
            collective_timeout: float = 60):
    """Run the worker on 2 ranks (``torchrun`` or ``launch``/spawn); a hang fails the test
    through ``subprocess.TimeoutExpired``."""
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps({"nprocs": 2, "out": str(tmp), "jobs": jobs,
                               "timeout": collective_timeout}))
    worker = [str(ROOT / "tests" / "bnn" / "_dist_worker.py"), str(cfg)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2"] + worker
    else:
        cmd = [sys.executable] + worker
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank ``torchrun`` session running every job (one start-up for all); the
    single-process references run in this process."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist")
    # 1 -> 2 ranks: a single-process run checkpointed after epoch 1, resumed by 2 ranks
    run_fit("svi", epochs=1, checkpoint_dir=str(tmp / "ck1"), num_particles=2)
    jobs = [
        {"name": "map", "method": "map", "epochs": 1},
        {"name": "map_uneven", "method": "map", "epochs": 1, "batch_size": 51},
        {"name": "svi", "method": "svi", "epochs": 1, "num_particles": 2},
        {"name": "resume12", "method": "svi", "epochs": 2, "num_particles": 2,
         "checkpoint_dir": str(tmp / "ck1")},
        {"name": "ck2", "method": "svi", "epochs": 1, "num_particles": 2,
         "checkpoint_dir": str(tmp / "ck2")},
        {"name": "nan", "method": "map", "epochs": 3, "checkpoint_dir": str(tmp / "cknan"),
         "corrupt": "AutoDelta.net.0.weight"},
    ]
    proc = _launch(tmp, jobs, torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {j["name"]: torch.load(tmp / f"{j['name']}.pt", weights_only=False) for j in jobs}
    return tmp, out


@pytest.mark.slow
@pytest.mark.parametrize("name, kw", [
    ("map", dict(method="map", epochs=1)),
    ("map_uneven", dict(method="map", epochs=1, batch_size=51)),  # shards 26 + 25, last 1 + 0
    ("svi", dict(method="svi", epochs=1, num_particles=2)),
])
def test_two_ranks_equal_single_process(runs, name, kw):
    _, out = runs
    ref, history = run_fit(**kw)
    diff = _max_diff(ref, out[name]["params"])
    assert diff < TOL, (name, diff)
    assert out[name]["history"]["loss"] == pytest.approx(history["loss"], rel=1e-12)
    # the fit moved the parameters: equality is not the trivial one
    bn, _ = setup()
    site = "AutoDelta.net.0.weight" if name.startswith("map") else "AutoNormal.locs.net.0.weight"
    assert float((ref[site] - bn.initial_values()["net.0.weight"]).abs().max()) > 1e-3


@pytest.mark.slow
def test_resume_across_world_sizes(runs):
    tmp, out = runs
    full, history = run_fit("svi", epochs=2, num_particles=2)
    # 1 rank (epoch 1) -> 2 ranks (epoch 2)
    assert _max_diff(full, out["resume12"]["params"]) < TOL
    assert out["resume12"]["history"]["loss"] == pytest.approx(history["loss"], rel=1e-12)
    # 2 ranks (epoch 1) -> 1 rank (epoch 2); rank 0 wrote the file atomically
    assert [f for f in os.listdir(tmp / "ck2")] == [bs.bnn.fit.CHECKPOINT_NAME]
    resumed, history2 = run_fit("svi", epochs=2, num_particles=2,
                                checkpoint_dir=str(tmp / "ck2"))
    assert _max_diff(full, resumed) < TOL
    assert history2["loss"] == pytest.approx(history["loss"], rel=1e-12)


@pytest.mark.slow
def test_nan_guard_stops_every_rank(runs):
    tmp, out = runs
    assert "net.0.weight" in out["nan"]["error"]
    assert out["nan"]["layer"] == "0" and out["nan"]["epoch"] == 1
    saved = torch.load(tmp / "cknan" / bs.bnn.fit.CHECKPOINT_NAME, weights_only=False)
    assert saved["state"]["epoch"] == 1


@pytest.mark.slow
def test_spawn_equal_then_raising_rank_stops_run(tmp_path):
    """``launch`` (torch.multiprocessing.spawn): a 2-rank MAP epoch equals the single process,
    then rank 1 raises after epoch 1 while rank 0 goes on into the next all-reduce: the run
    ends with DistributedError naming the rank, well before the 60 s collective timeout."""
    jobs = [{"name": "map", "method": "map", "epochs": 1},
            {"name": "fail", "method": "map", "epochs": 5, "fail_rank": 1}]
    proc = _launch(tmp_path, jobs, torchrun=False, timeout=150, collective_timeout=60)
    end = time.time()
    assert proc.returncode != 0
    assert "DistributedError: rank 1 of 2 failed" in proc.stderr, proc.stderr[-3000:]
    assert "deliberate failure on rank 1" in proc.stderr
    assert end - float((tmp_path / "fail.start").read_text()) < 40
    assert not (tmp_path / "fail.pt").exists()
    ref, _ = run_fit("map", epochs=1)
    got = torch.load(tmp_path / "map.pt", weights_only=False)["params"]
    assert _max_diff(ref, got) < TOL


def test_entry_point_one_rank(tmp_path, capsys):
    """``python -m bayes_spectral.distributed`` without torchrun: a one-rank group, made
    without touching os.environ and destroyed at the end."""
    from bayes_spectral.distributed import is_distributed, main

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: os.environ.get(k) for k in keys}
    assert main(["--epochs", "1", "--num-train", "128", "--hidden", "8",
                 "--checkpoint-dir", str(tmp_path)]) == 0
    assert "ranks 1, global batch 64" in capsys.readouterr().out
    assert not is_distributed() and {k: os.environ.get(k) for k in keys} == env
    assert os.listdir(tmp_path) == [bs.bnn.fit.CHECKPOINT_NAME]
    pyro.clear_param_store()


# --- in-process pieces --------------------------------------------------------------------


@pytest.mark.parametrize("n, batch, ranks", [(256, 64, 2), (256, 51, 2), (10, 4, 3), (7, 7, 1)])
def test_global_batch_shards_partition_the_global_batches(n, batch, ranks):
    perm = torch.randperm(n)
    samplers = [GlobalBatchShards(n, batch, ranks, r) for r in range(ranks)]
    for s in samplers:
        s.set_epoch(3, perm)
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == len(samplers[0]) == -(-n // batch) for p in per_rank)
    for i, parts in enumerate(zip(*per_rank, strict=True)):
        glob = perm[i * batch:(i + 1) * batch]
        assert torch.equal(torch.cat([idx for idx, _ in parts]), glob)
        assert all(size == glob.shape[0] for _, size in parts)
        sizes = [idx.shape[0] for idx, _ in parts]
        assert max(sizes) - min(sizes) <= 1
    # without a permutation: seed + epoch, the same on every rank, new each epoch
    a, b = GlobalBatchShards(n, batch, ranks, 0, seed=1), GlobalBatchShards(n, batch, ranks, 0,
                                                                             seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchShards(n, batch, 2, 2)


def test_likelihood_factor_formula():
    # equal shards with num_data: exactly 1; uneven: R b_r / b; no num_data: R
    assert likelihood_factor(256, 64, 32, 2) == 1.0
    assert likelihood_factor(256, 51, 26, 2) == pytest.approx(2 * 26 / 51)
    assert likelihood_factor(None, 64, 32, 2) == 2.0
    # sum over ranks of c_r * N / b_r * b_r / R = N: the DDP average weighs each example N / b
    n, b, shards, r = 1000, 10, [4, 3, 3], 3
    total = sum(likelihood_factor(n, b, s, r) * n / s * s for s in shards) / r
    assert total == pytest.approx(n / b * b)


def test_fit_distributed_without_group_raises():
    bn, data = setup()
    with pytest.raises(ValueError, match="process group"):
        bs.fit(bn, data, "map", epochs=1, distributed=True, progress=False)
    pyro.clear_param_store()


def test_split_prior_sites_balance_and_skip_tracked():
    from bayes_spectral.distributed import split_prior_sites
    from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 10))
    bn = bs.bayesian(net, {"0": lambda s: PowerLawSpectrum(2.0, 0.5, s),
                           "2": lambda s: PowerLawSpectrum(2.0, 0.5, s),
                           "4": lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s)},
                     tracked="4")
    # costs 32*64*32 > 32*32*32: one layer per rank; the tracked layer stays on every rank
    assert split_prior_sites(bn, 2) == [{"net.0.weight"}, {"net.2.weight"}]
    assert split_prior_sites(bn, 1) == [{"net.0.weight", "net.2.weight"}]


def test_prior_split_counts_each_prior_once_over_ranks():
    """Sum over ranks of the traced prior log-density = R x the single-process one."""
    from pyro import poutine

    from bayes_spectral.distributed import PriorSplit, split_prior_sites

    bn, (x, y) = setup()
    site = "net.0.weight"
    values = bn.initial_values()
    cond = poutine.condition(bn, data=values)
    whole = poutine.trace(cond).get_trace(x[:8], y[:8]).log_prob_sum(lambda n, _: n == site)
    owned = split_prior_sites(bn, 2)
    parts = []
    for r in range(2):
        with PriorSplit(owned[r], set().union(*owned) - owned[r], 2):
            tr = poutine.trace(cond).get_trace(x[:8], y[:8])
        parts.append(tr.log_prob_sum(lambda n, _: n == site))
    assert owned == [{site}, set()]
    assert float(parts[1]) == 0.0
    assert float(sum(parts) / 2) == pytest.approx(float(whole), rel=1e-12)
    pyro.clear_param_store()
