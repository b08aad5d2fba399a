"""Registries: Registry semantics, the built-in priors / penalties / data sets, a user's
entries used by ``compare`` (Python API) and by the CLI through ``--plugin``."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from bayes_spectral import cli
from bayes_spectral.apps import compare as C
from bayes_spectral.data import DATASETS, Split, load_digits
from bayes_spectral.distributions import PRIORS, GaussianSpectrum
from bayes_spectral.penalties import L1, PENALTIES
from bayes_spectral.registry import Registry, UnknownNameError


def test_register_get_names_and_contains():
    reg = Registry("widget")
    assert reg.names() == [] and len(reg) == 0

    @reg.register("b")
    def b():
        return 2

    reg.register("a")(len)
    assert reg.get("b") is b and reg.get("a") is len
    assert reg.names() == ["b", "a"]  # registration order, not sorted
    assert "a" in reg and "c" not in reg and list(reg) == ["b", "a"]


def test_unknown_name_lists_the_known_ones():
    reg = Registry("widget")
    reg.register("alpha")(1)
    reg.register("beta")(2)
    with pytest.raises(UnknownNameError) as err:
        reg.get("gamma")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert str(err.value) == "unknown widget 'gamma'; known: ['alpha', 'beta']"


def test_duplicate_name_is_refused_unless_replaced():
    reg = Registry("widget")
    reg.register("x")(1)
    reg.register("x")(1)  # the same object again: a no-op (re-import of a module)
    with pytest.raises(ValueError, match="widget 'x' is already registered"):
        reg.register("x")(2)
    assert reg.get("x") == 1
    reg.register("x", replace=True)(2)
    assert reg.get("x") == 2
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("")


def test_builtin_entries_are_compares_defaults():
    assert PRIORS.names()[:4] == ["gaussian", "powerlaw", "frechet_top", "spike_and_slab"]
    assert PENALTIES.names()[:5] == ["none", "weight_decay", "spectral_norm", "stable_rank",
                                     "weighted_alpha"]
    assert DATASETS.names()[:2] == ["digits", "mnist1d"]
    cfg = C.CompareConfig()
    assert cfg.priors == ("gaussian", "powerlaw", "frechet_top", "spike_and_slab")
    assert cfg.baselines == ("none", "weight_decay", "spectral_norm", "stable_rank",
                             "weighted_alpha")
    assert PENALTIES.get("none")(0.0) is None
    wd = PENALTIES.get("weight_decay")(4.0)
    w = torch.randn(5, 3)
    assert float(wd(w)) == pytest.approx(2.0 * float(w.square().sum()))
    prior = PRIORS.get("gaussian")(torch.Size([5, 3]))
    assert isinstance(prior, GaussianSpectrum) and prior.event_shape == (5, 3)


@pytest.fixture
def scratch_registries(monkeypatch):
    """Entries registered by a test vanish afterwards (copies of the registries' maps)."""
    for reg in (PRIORS, PENALTIES, DATASETS):
        monkeypatch.setattr(reg, "_items", dict(reg._items))  # restored after the test


def test_users_prior_penalty_and_dataset_run_in_compare(scratch_registries):
    digits = load_digits()
    calls = []

    @PRIORS.register("my_wide_gaussian")
    def my_wide_gaussian(shape):
        calls.append(tuple(shape))
        return GaussianSpectrum(2.0, shape, measure="penalty")

    PENALTIES.register("my_l1")(lambda c: L1(c))
    DATASETS.register("my_digits")(lambda seed=0: Split(
        digits.x_train[:128], digits.y_train[:128], digits.x_test[:64], digits.y_test[:64]))
    # MAP only: the subject is the registries (compare's sampler rows: tests/apps/test_compare.py)
    cfg = C.CompareConfig(dataset="my_digits", hidden=(8,), seeds=(0,), epochs=1, svi=False,
                          methods=("map",),
                          baselines=("my_l1",), priors=("my_wide_gaussian",),
                          coefs={"my_l1": 1e-3}, batch_size=64)
    table = C.compare(cfg, progress=None)["table"]
    assert list(zip(table.kind, table.method, strict=True)) == [("baseline", "my_l1"),
                                                                ("map", "my_wide_gaussian")]
    assert table.test_accuracy.between(0.0, 1.0).all() and len(table) == 2
    assert calls == [(8, 64), (10, 8)]  # one prior per Linear weight (out, in)
    assert C.CompareConfig(baselines=("my_l1",)).coef("my_l1") == C.DEFAULT_COEF


def test_compare_refuses_unregistered_names():
    with pytest.raises(ValueError, match=r"unknown priors \['nope'\]; available: \['gaussian'"):
        C.compare(C.CompareConfig(priors=("nope",)), progress=None)


def test_plugin_names_are_read_before_the_subcommand():
    argv = ["--plugin", "a", "--plugin=b", "--plug", "c", "fit", "--plugin", "d"]
    assert cli.plugin_names(argv) == ["a", "b", "c"]
    assert cli.plugin_names(["fit", "--prior", "powerlaw"]) == []


PLUGIN = textwrap.dedent('''
    from bayes_spectral.data import DATASETS, Split, load_digits
    from bayes_spectral.distributions import PRIORS, GaussianSpectrum


    @PRIORS.register("plugin_gaussian")
    def plugin_gaussian(shape):
        return GaussianSpectrum(1.0, shape, measure="penalty")


    @DATASETS.register("plugin_digits")
    def plugin_digits(seed=0):
        d = load_digits(seed=seed)
        return Split(d.x_train[:200], d.y_train[:200], d.x_test[:100], d.y_test[:100])
''')


def test_cli_plugin_registers_a_prior_for_fit(tmp_path, monkeypatch, capsys, request,
                                             scratch_registries):
    (tmp_path / "my_bs_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop("my_bs_plugin", None))
    code = cli.main(["--plugin", "my_bs_plugin", "fit", "--prior", "plugin_gaussian",
                     "--dataset", "plugin_digits", "--hidden", "4", "--epochs", "1",
                     "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    assert "with prior plugin_gaussian on plugin_digits" in out and "test accuracy" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["plugin"] == ["my_bs_plugin"] and config["prior"] == "plugin_gaussian"


def test_cli_name_without_its_plugin_is_an_invalid_choice(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--prior", "plugin_gaussian"])
    assert exc.value.code == cli.EXIT_USAGE
    assert "invalid choice: 'plugin_gaussian'" in capsys.readouterr().err


def test_cli_unknown_plugin_exits_2_with_one_line(capsys):
    code = cli.main(["--plugin", "no_such_bs_plugin_module", "fit", "--help"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert err.count("\n") == 1 and "no_such_bs_plugin_module" in err
    assert err.startswith("error: --plugin 'no_such_bs_plugin_module' cannot be imported")
