"""Smoke test of ``benchmarks/bench_penalties.py --rows own --nets own`` (issue 20's targets
on the own-models issue's nets): one round on the quick settings, one row per net and
penalty, each with a finite positive ratio; each net's loss fits its output (MSE for the
regression net, cross-entropy otherwise) and every penalty of the group selects rows of
every net. No timing is asserted."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bp = pytest.importorskip("bench_penalties")

OWN = ["cnn", "transformer", "lstm", "gru", "regression", "dropout"]


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_own_group_prints_one_finite_row_per_net_and_penalty(capsys, threads):
    bp.main(["--quick", "--threads", "1", "--interleave", "--rows", "own", "--nets", "own",
             "--rounds", "1"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\S[^|]*?) +\| (\S[^|]*?) +\| +([\d.]+) \| +(\S+)x \| interleaved",
                      out, re.M)
    labels = [bp.OWN_NETS[k][3] for k in OWN]
    assert sorted({r[0] for r in rows}) == sorted(labels)
    assert len(rows) == len(OWN) * len(bp.OWN_ROWS)
    for label in labels:
        assert [r[1] for r in rows if r[0] == label] == bp.OWN_ROWS
    for _, _, plain_ms, ratio in rows:
        assert float(plain_ms) > 0
        assert math.isfinite(float(ratio)) and float(ratio) > 0


def test_own_rows_cover_the_issue_penalties():
    keys = {bp._parse(r)[0] for r in bp.OWN_ROWS}
    assert keys == {"spectral norm", "spectral norm fused", "spectral norm fused block2",
                    "Frechet fused", "stable rank fused", "power law subspace",
                    "weighted alpha subspace"}
    lazy = {bp._parse(r)[0] for r in bp.OWN_ROWS if bp._parse(r)[2] == bp.LAZY}
    assert lazy == keys - {"spectral norm", "spectral norm fused block2"}
    # the batched fallback beside the per-row one (Regularizer(batch=False)) for the
    # rank-one penalties whose unhooked rows it batches
    per_row = {bp._parse(r)[0] for r in bp.OWN_ROWS if not bp._parse(r)[3]}
    assert per_row == {"spectral norm fused", "Frechet fused", "stable rank fused"}
    assert all(bp._parse(r)[1] for r in bp.OWN_ROWS)  # all in place ([grad])


@pytest.mark.parametrize("net", OWN)
def test_own_net_loss_fits_the_model(net):
    make, _, _, _, data = bp.OWN_NETS[net]
    torch.manual_seed(0)
    model = make()
    xs, ys, loss = data()
    out = model(xs[0])
    if net == "regression":
        want = torch.nn.functional.mse_loss(out.squeeze(-1), ys[0])
    else:
        want = torch.nn.functional.cross_entropy(out, ys[0])
    assert loss(out, ys[0]).item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("net", OWN)
def test_every_own_penalty_acts_on_every_net(net):
    """One regularised step's gradient differs from the plain one (the Regularizer selected
    at least one row and its penalty reached it)."""
    make, _, _, _, data = bp.OWN_NETS[net]
    xs, ys, loss = data()
    for key in sorted({bp._parse(r)[0] for r in bp.OWN_ROWS}):
        torch.manual_seed(0)
        model = make().double()
        x = xs[0].double() if xs[0].is_floating_point() else xs[0]
        y = ys[0].double() if ys[0].is_floating_point() else ys[0]
        loss(model(x), y).backward()
        plain = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with bp.P.Regularizer(model, bp.PENALTIES[key](), log=False) as reg:
            loss(model(x), y).backward()
            reg.accumulate_grad()
        assert reg.layers, (net, key)
        pairs = zip(model.parameters(), plain, strict=True)
        diff = max((p.grad - g).abs().max().item() for p, g in pairs)
        assert diff > 0, (net, key)
