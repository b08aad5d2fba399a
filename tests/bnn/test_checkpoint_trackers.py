"""``fit(..., checkpoint_dir=...)`` carries the tracked priors' state (issue 20 follow-up).

The tail trackers of tracked power-law priors, the warm-started blocks and probe generators
of ``tracked_mode="fast"`` are saved in the checkpoint (key ``"trackers"``) and restored on
resume; nothing is renewed at a checkpoint boundary. So, bit for bit on the CPU: a fit
without ``checkpoint_dir`` == the same fit with it == that fit interrupted after 2 epochs
and resumed from the file (MAP, SVI, lazy priors, SGHMC with two chains); the reference fit
has no checkpoint boundary before its end (``checkpoint_every`` > ``epochs``), so a
checkpoint boundary must not change the trajectory. A checkpoint whose
tracker state does not fit the model is refused, naming what differs, before anything
changes.
"""

from __future__ import annotations

import pytest
import torch
from resume_helpers import Interrupt
from resume_helpers import stop_at_call as _stop_at
from torch import nn

import bayes_spectral as bs
from bayes_spectral._io import load_tensors
from bayes_spectral.bnn.checkpoint import CHECKPOINT_NAME, save_checkpoint
from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum
from bayes_spectral.penalties.state import flatten_state, unflatten_state

N = 128


@pytest.fixture(scope="module")
def data():
    split = bs.data.load_digits()
    return split.x_train[:N], split.y_train[:N]


def _model(case: str, tracked=True):
    """``tail``: a 64-96-10 MLP, a tracked power law on layer 0 (the top 10% as the tail: a
    block of need + 8 = 15 columns of 64, so the tracker tracks instead of decomposing)
    and a tracked Frechet on layer 2 (power iteration, a buffer); ``fast``: a 64-24-10 MLP,
    a fixed-xmin power law on layer 0 and Frechet on layer 2 in ``tracked_mode="fast"``
    (block iteration, probes)."""
    torch.manual_seed(0)
    hidden = 24 if case == "fast" else 96
    net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    frechet = FrechetTopEigenvalue(2.0, 1.0, 0.5, (10, hidden))
    if case == "fast":
        priors = {"0": PowerLawSpectrum(2.5, 0.05, (hidden, 64), xmin=0.2), "2": frechet}
        return bs.bayesian(net, priors, num_data=N, tracked=tracked, tracked_mode="fast")
    priors = {"0": PowerLawSpectrum(2.0, 0.5, (hidden, 64), xmin_quantile=0.9), "2": frechet}
    return bs.bayesian(net, priors, num_data=N, tracked=tracked)


CASES = {  # name -> (model case, method, fit keywords)
    "map tail": ("tail", "map", {}),
    "svi tail": ("tail", "svi", {}),
    "map fast": ("fast", "map", {}),
    "svi fast": ("fast", "svi", {}),
    "map lazy tail": ("tail", "map", {"prior_every": 3}),
    "sghmc tail 2 chains": ("tail", "sghmc", {"num_chains": 2, "burn_in": 1}),
}


def _fit(case, data, **extra):
    kind, method, kw = CASES[case]
    lr = 1e-3 if method == "sghmc" else 5e-3
    return bs.fit(_model(kind), data, method, epochs=4, batch_size=32, lr=lr, seed=1,
                  progress=False, **kw, **extra)


def _snapshot(res) -> tuple:
    """``(history, params, samples)`` of a result, taken at once (``params()`` reads the
    global param store, which the next fit clears)."""
    return res.history, res.params(), res.samples


def _same(a: tuple, b: tuple, what: str) -> None:
    assert a[0] == b[0], f"{what}: histories differ"
    assert sorted(a[1]) == sorted(b[1]), what
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), (what, k)
    assert (a[2] is None) == (b[2] is None), what
    for k in a[2] or {}:
        assert torch.equal(a[2][k], b[2][k]), (what, k)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_changes_nothing_and_resume_is_exact(case, data, tmp_path):
    plain = _snapshot(_fit(case, data, checkpoint_every=100))  # no boundary mid-run
    with_dir = _snapshot(_fit(case, data, checkpoint_dir=tmp_path / "a"))
    _same(with_dir, plain, f"{case}: with checkpoint_dir (every epoch) vs without")
    # interrupted after 2 epochs (SGHMC: inside chain 0), and for the sampler after 6
    # (inside chain 1), then resumed from the file
    stops = [2, 6] if CASES[case][1] == "sghmc" else [2]
    for i, n in enumerate(stops):
        folder = tmp_path / f"b{i}"
        with pytest.raises(Interrupt):
            _fit(case, data, checkpoint_dir=folder, callbacks=[_stop_at(n)])
        resumed = _snapshot(_fit(case, data, checkpoint_dir=folder))
        _same(resumed, with_dir, f"{case}: stopped after {n} epochs and resumed")


@pytest.mark.parametrize("case", ["map tail", "svi fast", "sghmc tail 2 chains"])
def test_a_second_fit_of_the_same_model_repeats_the_first(case, data):
    """Trackers warm at the end of a fit are not carried into the next ``fit`` of the same
    model: it starts afresh, as the first did (failed while only checkpoints were renewed)."""
    kind, method, kw = CASES[case]
    model = _model(kind)
    lr = 1e-3 if method == "sghmc" else 5e-3
    runs = [_snapshot(bs.fit(model, data, method, epochs=3, batch_size=32, lr=lr, seed=1,
                             progress=False, **kw)) for _ in range(2)]
    _same(runs[1], runs[0], f"{case}: second fit of the same model")


def test_the_tracker_state_is_in_the_file_and_loads_safely(data, tmp_path):
    _fit("map fast", data, checkpoint_dir=tmp_path)
    saved = load_tensors(tmp_path / CHECKPOINT_NAME)  # weights_only=True
    layers = saved["trackers"]["layers"]
    assert sorted(layers) == ["0", "2"]
    assert layers["0"]["penalty"] == "PowerLawPrior" and layers["0"]["mode"] == "fast"
    assert layers["2"]["law"] == "FrechetTopEigenvalue"
    assert layers["2"]["state"]["layers"]["weight"]["top"]["V"].shape[:2] == (1, 24)
    assert layers["0"]["state"]["generators"]["cpu"].dtype == torch.uint8
    # plain data and tensors only: the safetensors form round-trips (strides kept)
    tensors, meta = flatten_state(saved["trackers"])
    back = unflatten_state(tensors, meta)
    bn = _model("fast")
    bn.load_tracker_state_dict(back, "round trip")
    again, meta2 = flatten_state(bn.tracker_state_dict())
    assert meta2 == meta and sorted(again) == sorted(tensors)
    for k, t in tensors.items():
        assert torch.equal(again[k], t), k


def _write_and_tamper(data, tmp_path, change):
    """A 2-epoch checkpoint of ``map tail``, rewritten after ``change(saved)``."""
    with pytest.raises(Interrupt):
        _fit("map tail", data, checkpoint_dir=tmp_path, callbacks=[_stop_at(2)])
    path = tmp_path / CHECKPOINT_NAME
    saved = load_tensors(path)
    change(saved)
    save_checkpoint(path, saved)


def _tracker_v(saved):
    return saved["trackers"]["layers"]["0"]["state"]["layers"]["weight"]["tracker"]


@pytest.mark.parametrize("change, match", [
    (lambda s: s.pop("trackers"),
     r"checkpoint\.pt.*no tracker state \('trackers'\).*layers \['0'\]"),
    (lambda s: s["trackers"]["layers"].pop("0"),
     r"checkpoint\.pt.*tracker state.*layer '0'.*not in the checkpoint"),
    (lambda s: s["trackers"]["layers"]["0"].update(law="GaussianSpectrum"),
     r"layer '0'.*law GaussianSpectrum \(checkpoint\) vs PowerLawSpectrum \(now\)"),
    (lambda s: s["trackers"]["layers"]["0"].update(mode="fast"),
     r"layer '0'.*mode 'fast' \(checkpoint\) vs 'tracked' \(now\)"),
    (lambda s: s["trackers"]["layers"]["0"].update(shape=[24, 32]),
     r"layer '0'.*weight shape \[24, 32\] \(checkpoint\) vs \[96, 64\] \(now\)"),
    (lambda s: _tracker_v(s).update(V=torch.zeros(1, 30, _tracker_v(s)["V"].shape[-1])),
     r"layer '0'.*tracker.*V.*shape \(1, 30, \d+\).*\(1, 64, k\)"),
])
def test_a_tracker_state_that_does_not_fit_is_refused_before_anything_changes(
        data, tmp_path, change, match):
    _write_and_tamper(data, tmp_path, change)
    bn = _model("tail")
    before = {k: v.detach().clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        bs.fit(bn, data, "map", epochs=4, batch_size=32, lr=5e-3, seed=1, progress=False,
               checkpoint_dir=tmp_path)
    # nothing loaded: the trackers are the fresh ones every fit starts with
    assert bn._tail_penalties and all(not p._trackers for p in bn._tail_penalties.values())
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_that_tracks_more_layers_is_refused(data, tmp_path):
    """Layer 2 tracked only now (the fingerprint does not see ``tracked=``): refused."""
    with pytest.raises(Interrupt):
        bs.fit(_model("tail", tracked="2"), data, "map", epochs=4, batch_size=32, lr=5e-3,
               seed=1, progress=False, checkpoint_dir=tmp_path, callbacks=[_stop_at(2)])
    with pytest.raises(ValueError, match=r"tracker state.*layer '0'.*not in the checkpoint"):
        bs.fit(_model("tail"), data, "map", epochs=4, batch_size=32, lr=5e-3, seed=1,
               progress=False, checkpoint_dir=tmp_path)


def test_an_untracked_model_resumes_an_old_checkpoint_without_tracker_state(data, tmp_path):
    """Nothing to restore: a checkpoint written before the key existed still resumes."""
    def fit(**kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
        bn = bs.bayesian(net, {"0": PowerLawSpectrum(2.0, 0.5, (24, 64))}, num_data=N)
        return bs.fit(bn, data, "map", epochs=3, batch_size=32, lr=5e-3, seed=1,
                      progress=False, **kw)

    full = fit().params()
    with pytest.raises(Interrupt):
        fit(checkpoint_dir=tmp_path, callbacks=[_stop_at(2)])
    path = tmp_path / CHECKPOINT_NAME
    saved = load_tensors(path)
    saved.pop("trackers", None)
    save_checkpoint(path, saved)
    resumed = fit(checkpoint_dir=tmp_path).params()
    for k, v in full.items():
        assert torch.equal(resumed[k], v), k
