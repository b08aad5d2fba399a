"""Hostile and careless input to ``fit`` and its checkpoints (issue 18, items 1, 2, 5 and the
"corrupt checkpoint", "device", "NaN in the forward pass" lines).

Each case: an id, a callable of the temporary folder, and the expected exception type and a
regex its message must match (the file, setting, site or layer it names). Where a checkpoint
is involved, the case also checks that the file was not changed and that nothing ran.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral._io import UnreadableFileError
from bayes_spectral.distributions import GaussianSpectrum, PowerLawSpectrum

N = 48
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch/machine")


def gaussian(s):
    return GaussianSpectrum(0.2, s, measure="penalty")


def data(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def net(hidden: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def model(hidden: int = 6, prior=gaussian, num_data=N, likelihood="categorical"):
    return bs.bayesian(net(hidden), {nn.Linear: prior}, num_data=num_data,
                       likelihood=likelihood)


KW = dict(epochs=2, batch_size=16, lr=1e-2, progress=False, seed=0)


def run(folder, method="map", bn=None, **kw) -> bs.FitResult:
    """A fit of the tiny network into ``folder`` (``kw`` overrides :data:`KW`)."""
    return bs.fit(bn if bn is not None else model(), data(), method,
                  checkpoint_dir=folder, **{**KW, **kw})


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- item 1, 3


class _Boom:
    """Unpickling it creates the file ``path`` (stands for ``os.system``)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _malicious(folder: Path) -> Path:
    """A checkpoint whose unpickling would create ``folder/PWNED``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"param_store": _Boom(folder / "PWNED"), "optim": {}, "rng": {}, "history": {},
                "state": {}, "buffers": {}, "method": "map"}, folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


def _written(folder: Path) -> Path:
    run(folder, epochs=1)
    return folder / "checkpoint.pt"


def _truncated(folder: Path) -> Path:
    path = _written(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _empty(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"")
    return folder / "checkpoint.pt"


def _not_zip(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_text("this is not a checkpoint\n")
    return folder / "checkpoint.pt"


def _plain_pickle(folder: Path) -> Path:
    """A legacy (non-zip) pickle of a harmless object of a non-allowlisted class."""
    folder.mkdir(parents=True)
    with open(folder / "checkpoint.pt", "wb") as fh:
        pickle.dump(zipfile.ZipInfo("x"), fh)
    return folder / "checkpoint.pt"


def _missing_keys(folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save({"param_store": {"params": {}, "constraints": {}}}, folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


def _a_list(folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save([torch.zeros(3)], folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


def _a_folder(folder: Path) -> Path:
    (folder / "checkpoint.pt").mkdir(parents=True)
    return folder / "checkpoint.pt"


CORRUPT = [
    ("malicious-pickle", _malicious, r"weights_only=True"),
    ("truncated", _truncated, r"cannot be loaded"),
    ("zero-bytes", _empty, r"empty file \(0 bytes\)"),
    ("not-a-zip", _not_zip, r"cannot be loaded"),
    ("legacy-pickle-other-class", _plain_pickle, r"cannot be loaded"),
    ("dict-missing-keys", _missing_keys, r"missing optim, rng, history"),
    ("a-list", _a_list, r"holds a list, not a dict"),
    ("a-folder", _a_folder, r"not a regular file"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_or_unsafe_checkpoint_is_refused_naming_the_file(tmp_path, make, pattern):
    path = make(tmp_path / "ck")
    before = digest(path) if path.is_file() else None
    with pytest.raises(UnreadableFileError, match=pattern) as err:
        run(tmp_path / "ck")
    assert str(path) in str(err.value)
    assert not (tmp_path / "ck" / "PWNED").exists()  # nothing ran
    if before is not None:
        assert digest(path) == before  # the file is left as it was


def test_checkpoint_holds_tensors_and_plain_data_only(tmp_path):
    """The file written by fit loads with weights_only=True (no pickled objects)."""
    path = _written(tmp_path / "ck")
    saved = torch.load(path, weights_only=True)
    assert saved["method"] == "map" and saved["fingerprint"]["lr"] == 1e-2
    assert all(isinstance(v, str) for v in saved["param_store"]["constraints"].values())


def test_same_settings_resume_bit_for_bit(tmp_path):
    full = run(tmp_path / "a", epochs=3)

    def stop(info):
        return info["epoch"] == 1

    run(tmp_path / "b", epochs=3, callbacks=[stop])
    resumed = run(tmp_path / "b", epochs=3)
    assert resumed.history == full.history and resumed.epochs_run == 3
    a, b = full.params(), resumed.params()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- item 2

def _other_prior():
    return model(prior=lambda s: PowerLawSpectrum(2.0, 0.5, s))


CHANGED = [  # (id, method, model factory, fit overrides, regex naming the setting)
    ("map-as-svi", "svi", model, {}, r"method: 'map' \(checkpoint\) vs 'svi' \(now\)"),
    ("other-prior", "map", _other_prior, {}, r"priors\[0\]: .*GaussianSpectrum.*PowerLaw"),
    ("other-prior-scale", "map",
     lambda: model(prior=lambda s: GaussianSpectrum(0.5, s, measure="penalty")), {},
     r"priors\[0\]"),
    ("other-lr", "map", model, {"lr": 5e-2}, r"lr: 0\.01 \(checkpoint\) vs 0\.05 \(now\)"),
    ("other-width", "map", lambda: model(hidden=7), {},
     r"parameters\[AutoDelta\.net\.0\.weight\]: \[6, 4\] \(checkpoint\) vs \[7, 4\]"),
    ("other-batch-size", "map", model, {"batch_size": 8}, r"batch_size: 16 .* vs 8"),
    ("other-seed", "map", model, {"seed": 1}, r"seed: 0 .* vs 1"),
    ("other-shuffle", "map", model, {"shuffle": False}, r"shuffle: True .* vs False"),
    ("other-dtype", "map", model, {"dtype": torch.float64},
     r"dtype: 'torch\.float32' .* vs 'torch\.float64'"),
    ("other-num-data", "map", lambda: model(num_data=2 * N), {}, r"num_data: 48 .* vs 96"),
    ("other-guide", "map", model, {"guide": "normal"}, r"guide: 'delta' .* vs 'normal'"),
]


@pytest.mark.parametrize("method, make, kw, pattern", [c[1:] for c in CHANGED],
                         ids=[c[0] for c in CHANGED])
def test_resume_with_other_settings_is_refused_by_name(tmp_path, method, make, kw, pattern):
    run(tmp_path, epochs=1)
    path = tmp_path / "checkpoint.pt"
    before = digest(path)
    with pytest.raises(ValueError, match=pattern) as err:
        run(tmp_path, method, bn=make(), **kw)
    assert str(path) in str(err.value) and "resume=False" in str(err.value)
    assert digest(path) == before


def test_svi_checkpoint_resumed_with_other_num_particles(tmp_path):
    run(tmp_path, "svi", epochs=1)
    with pytest.raises(ValueError, match=r"num_particles: 1 .* vs 2"):
        run(tmp_path, "svi", num_particles=2)


def test_checkpoint_without_fingerprint_is_refused(tmp_path):
    path = _written(tmp_path)
    saved = torch.load(path, weights_only=True)
    del saved["fingerprint"]
    torch.save(saved, path)
    with pytest.raises(ValueError, match="no fingerprint"):
        run(tmp_path)


def test_resume_false_starts_over_after_a_refusal(tmp_path):
    run(tmp_path, epochs=1)
    res = run(tmp_path, lr=5e-2, resume=False, epochs=1)
    assert res.epochs_run == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["fingerprint"]["lr"] == 5e-2


# ----------------------------------------------------------------------------- item 5


def _fit(**kw):
    return lambda: bs.fit(model(), data(), **{**KW, **kw})


class _Divide(nn.Module):
    """``linear(x) / x[:, 0]``: infinite output for a row whose first input is 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) / x[:, :1]


def _forward_nan(row: int):
    def go():
        x, y = data()
        x[row, 0] = 0.0
        bn = bs.bayesian(_Divide(), {nn.Linear: gaussian}, num_data=N)
        bs.fit(bn, (x, y), "map", **{**KW, "shuffle": False})
    return go


def _regression_val_accuracy():
    x, _ = data()
    y = torch.randn(N)
    bn = model(likelihood="gaussian")
    bs.fit(bn, (x, y), "map", monitor="val_accuracy", val_data=(x, y), **KW)


GUARDS = [
    ("lr-inf", _fit(lr=float("inf")), ValueError, r"lr must be a positive finite number.*inf"),
    ("lr-nan", _fit(lr=float("nan")), ValueError, r"lr must be .*nan"),
    ("lr-zero", _fit(lr=0.0), ValueError, r"lr must be"),
    ("lr-negative", _fit(lr=-1e-3), ValueError, r"lr must be"),
    ("lr-string", _fit(lr="0.1"), ValueError, r"lr must be .*'0\.1'"),
    ("num-particles-0", _fit(method="svi", num_particles=0), ValueError,
     r"num_particles must be a positive integer, got 0"),
    ("num-particles-negative", _fit(num_particles=-2), ValueError, r"num_particles .*-2"),
    ("num-particles-fraction", _fit(num_particles=1.5), ValueError, r"num_particles .*1\.5"),
    ("svi-huge-lr", _fit(method="svi", lr=1e3, epochs=5), bs.NonFiniteError,
     r"parameter 'AutoNormal\.scales\.net\.\d\.weight' \(layer '\d'\) left its support"),
    ("forward-nan-first-batch", _forward_nan(3), bs.NonFiniteError,
     r"non-finite output of the forward pass before training .*every parameter finite.*"
     r"division by zero"),
    ("forward-nan-later-batch", _forward_nan(40), bs.NonFiniteError,
     r"non-finite output of the forward pass at epoch 1, step 3 with every parameter "
     r"finite \(largest \|parameter\| .* in '[\w.]*lin\.(weight|bias)'\); .*division by zero"),
    ("map-huge-lr-forward-overflow", _fit(lr=1e30, epochs=3), bs.NonFiniteError,
     r"non-finite .*the parameters grew huge: lower the learning rate"),
    ("device-cuda", _fit(device="cuda"), ValueError, r"device 'cuda': CUDA is not available"),
    ("device-bogus", _fit(device="bogus"), ValueError, r"device 'bogus' is not a torch device"),
    ("val-accuracy-regression", _regression_val_accuracy, ValueError,
     r"monitor='val_accuracy' needs a classification likelihood.*'gaussian'"),
]


@pytest.mark.parametrize("call, exc, pattern", [
    pytest.param(*c[1:], id=c[0], marks=[NO_CUDA] if c[0] == "device-cuda" else [])
    for c in GUARDS])
def test_guard_gaps(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_forward_nan_keeps_the_parameters_finite(tmp_path):
    """The step with the NaN output is not applied: the last checkpoint stays finite."""
    with pytest.raises(bs.NonFiniteError) as err:
        _forward_nan(40)()
    assert err.value.site == "obs" and err.value.step == 3


def test_checkpoint_fingerprint_on_disk_is_plain(tmp_path):
    path = _written(tmp_path)
    fp = torch.load(path, weights_only=True)["fingerprint"]
    assert fp["method"] == "map" and fp["guide"] == "delta" and fp["batch_size"] == 16
    assert fp["parameters"]["AutoDelta.net.0.weight"] == [6, 4]
    assert fp["priors"]["0"]["class"].endswith("GaussianSpectrum")
    assert os.path.getsize(path) > 0


def test_cli_resume_with_other_width_exits_2_and_keeps_config(tmp_path, capsys):
    """``bayes-spectral fit --resume`` with another ``--hidden``: exit 2, one line naming the
    differing parameter shapes; config.json and the checkpoint are left as they were."""
    from bayes_spectral import cli

    fit = ["fit", "--prior", "gaussian", "--epochs", "1", "--batch-size", "512",
           "--out", str(tmp_path)]
    assert cli.main([*fit, "--hidden", "8"]) == 0
    config, ckpt = digest(tmp_path / "config.json"), digest(tmp_path / "checkpoint" /
                                                              "checkpoint.pt")
    capsys.readouterr()
    assert cli.main([*fit, "--hidden", "9", "--resume"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(r"fc1\.weight\]: \[8, 64\] \(checkpoint\) vs \[9, 64\]",
                                       err[0])
    assert digest(tmp_path / "config.json") == config
    assert digest(tmp_path / "checkpoint" / "checkpoint.pt") == ckpt
