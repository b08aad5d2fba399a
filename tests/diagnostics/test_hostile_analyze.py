"""Hostile and careless input to ``analyze`` (issue 18: one bad layer must not abort a whole
analysis; sparse and meta tensors rejected per layer, naming the tensor).

Rows ``(id, model factory, expectation)``: ``Kept(layers, bad, regex)`` — the analysis
carries on with ``layers``, leaves ``bad`` out with a warning naming it, and
``ds.attrs["left_out"]`` gives the reason matching ``regex``; ``Raises(type, regex)`` —
no layer could be analysed.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral import cli


@dataclass(frozen=True)
class Kept:
    layers: tuple[str, ...]
    bad: str
    regex: str


@dataclass(frozen=True)
class Raises:
    exc: type
    regex: str


def good(seed: int = 0, shape=(20, 16)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_b(bad: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"a.weight": good(), "b.weight": bad}


def _inf() -> torch.Tensor:
    w = good(1)
    w[3, 4] = float("inf")
    return w


def _module(bad: str):
    """Linear(16, 20) - Linear(20, 24) with the second layer broken as ``bad`` says."""
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 20), nn.Linear(20, 24))
        with torch.no_grad():
            if bad == "nan":
                m[1].weight[0, 0] = float("nan")
            elif bad == "zeros":
                m[1].weight.zero_()
        if bad == "meta":
            m[1].to("meta")
        return m
    return make


CASES = [
    ("sd-meta", lambda: with_b(torch.empty(20, 16, device="meta")),
     Kept(("a",), "b.weight", r"tensor 'b\.weight' of shape \(20, 16\) is on the meta device")),
    ("sd-sparse-coo", lambda: with_b(good(1).to_sparse()),
     Kept(("a",), "b.weight", r"tensor 'b\.weight' is a torch\.sparse_coo tensor")),
    ("sd-sparse-csr", lambda: with_b(good(1).to_sparse_csr()),
     Kept(("a",), "b.weight", r"tensor 'b\.weight' is a torch\.sparse_csr tensor")),
    ("sd-nan", lambda: with_b(torch.full((20, 16), float("nan"))),
     Kept(("a",), "b", r"b: could not be analysed: .*320 NaN")),
    ("sd-inf", lambda: with_b(_inf()), Kept(("a",), "b", r"b: could not be analysed: .*1 Inf")),
    ("sd-zeros", lambda: with_b(torch.zeros(20, 16)),
     Kept(("a",), "b", r"b: could not be analysed: too few non-zero eigenvalues")),
    ("sd-bad-first", lambda: {"b.weight": torch.zeros(20, 16), "a.weight": good()},
     Kept(("a",), "b", r"b: could not be analysed")),
    ("module-nan", _module("nan"), Kept(("0",), "1", r"1: could not be analysed: .*NaN")),
    ("module-zeros", _module("zeros"), Kept(("0",), "1", r"1: could not be analysed")),
    ("module-meta", _module("meta"),
     Kept(("0",), "1", r"weight of layer '1' of shape \(24, 20\) is on the meta device")),
    ("all-nan", lambda: {"b.weight": torch.full((20, 16), float("nan"))},
     Raises(ValueError, r"no layer could be analysed: b: .*NaN")),
    ("all-sparse", lambda: {"b.weight": good().to_sparse(), "c.weight": good(2).to_sparse()},
     Raises(ValueError, r"no layer could be analysed: b\.weight: .*sparse.*c\.weight")),
    ("all-meta-module", lambda: nn.Linear(16, 20, device="meta"),
     Raises(ValueError, r"no layer could be analysed: .*meta device")),
]


@pytest.mark.parametrize("make, want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_layers(make, want):
    model = make()
    if isinstance(want, Raises):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(want.exc, match=want.regex):
                bs.analyze(model)
        return
    with pytest.warns(UserWarning, match=re.escape(want.bad)):
        ds = bs.analyze(model)
    assert tuple(ds.layer.values) == want.layers
    assert re.search(want.regex, ds.attrs["left_out"]), ds.attrs["left_out"]
    assert np.isfinite(ds.alpha.values).all()


def test_the_good_layer_keeps_its_numbers():
    """The analysed layer's metrics equal those of an analysis of it alone."""
    alone = bs.analyze({"a.weight": good()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = bs.analyze(with_b(torch.full((20, 16), float("nan"))))
    for key in ("alpha", "log_norm", "stable_rank", "alpha_weighted"):
        if key in alone:
            np.testing.assert_array_equal(mixed[key].values, alone[key].values)
    assert mixed.attrs["failed"].startswith("b: ")


def test_cli_exit_4_only_when_no_layer_could_be_analysed(tmp_path, capsys):
    torch.save({"b.weight": torch.full((20, 16), float("nan"))}, tmp_path / "bad.pt")
    torch.save(with_b(torch.full((20, 16), float("nan"))), tmp_path / "mixed.pt")
    assert cli.main(["analyze", str(tmp_path / "bad.pt")]) == 4
    err = capsys.readouterr().err
    assert "no layer could be analysed" in err and "Traceback" not in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["analyze", str(tmp_path / "mixed.pt")]) == 0
