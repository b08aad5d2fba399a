"""The bayes-spectral command: help, analysis of files, safe loading, exit codes."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from bayes_spectral import cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bayes_spectral.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands_and_examples():
    res = run_cli("--help")
    assert res.returncode == 0
    assert "analyze" in res.stdout and "examples:" in res.stdout
    res = run_cli("analyze", "--help")
    assert res.returncode == 0 and "--example" in res.stdout


def test_analyze_state_dict_file_prints_table_and_csv(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 30))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    code = cli.main(["analyze", str(path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "alpha" in out and "0 " in out and "2 " in out
    csv = (tmp_path / "out" / "analysis.csv").read_text().splitlines()
    assert len(csv) == 3  # header + two layers
    assert (tmp_path / "out" / "esd.png").stat().st_size > 10_000
    import bayes_spectral as bs

    alpha0 = float(bs.spectral_metrics(model[0].weight.detach().double())["alpha"])
    assert f"{alpha0:.6g}"[:5] in (tmp_path / "out" / "analysis.csv").read_text()


def test_safetensors_file(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(30, 20), "fc.bias": torch.randn(30)},
              str(tmp_path / "m.safetensors"))
    assert cli.main(["analyze", str(tmp_path / "m.safetensors")]) == 0
    assert "fc" in capsys.readouterr().out


class Evil:
    def __reduce__(self):
        return (print, ("owned",))


@pytest.mark.parametrize(
    "content, words",
    [
        (b"not a checkpoint at all", "cannot be loaded safely"),
        (None, "cannot be loaded safely"),  # a pickled arbitrary object
    ],
)
def test_corrupt_or_malicious_files_fail_cleanly(tmp_path, capsys, content, words):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"w": Evil()}, path)
    else:
        path.write_bytes(content)
    code = cli.main(["analyze", str(path)])
    err = capsys.readouterr()
    assert code == cli.EXIT_BAD_FILE
    assert words in err.err
    assert "owned" not in err.out


def test_missing_file_and_no_layers(tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path / "nope.pt")]) == cli.EXIT_BAD_FILE
    torch.save({"bias": torch.randn(4)}, tmp_path / "b.pt")
    assert cli.main(["analyze", str(tmp_path / "b.pt")]) == cli.EXIT_NO_LAYERS
    assert "no weight layer" in capsys.readouterr().err


def test_reproduce_help_lists_the_reference_models():
    res = run_cli("reproduce", "--help")
    assert res.returncode == 0
    from bayes_spectral.models import REFERENCE_MODELS

    assert len(REFERENCE_MODELS) == 6  # one per paper, plus the posterior reading of Xiao's
    papers = {text.split(":")[0].split(",")[0] for text in REFERENCE_MODELS.values()}
    assert len(papers) == 5
    for name in REFERENCE_MODELS:
        assert name in res.stdout


def test_reproduce_small_writes_table_and_plot(tmp_path, capsys):
    import pandas as pd

    code = cli.main(["reproduce", "low_rank_weight_decay", "--small", "--seed", "0",
                     "--out", str(tmp_path)])
    assert code == 0
    df = pd.read_csv(tmp_path / "low_rank_weight_decay.csv")
    assert len(df) == 4 and set(df.seed) == {0}
    assert (tmp_path / "low_rank_weight_decay.png").stat().st_size > 10_000
    # the paper's claim, visible in the printed table: weight decay lowers the effective rank
    for _, part in df.groupby("dataset"):
        by_wd = part.set_index("weight_decay")["effective_rank"]
        assert by_wd[0.1] < 0.5 * by_wd[0.0]
    assert "effective_rank" in capsys.readouterr().out
    # the settings are recorded next to the table, so a notebook can reuse it (load_or_run)
    import json

    from bayes_spectral.models import low_rank_weight_decay as lr
    from bayes_spectral.models._common import config_record, load_or_run

    cfg = lr.Config.small()
    cfg.seeds = (0,)
    recorded = json.loads((tmp_path / "low_rank_weight_decay_config.json").read_text())
    assert recorded == config_record(cfg)

    def must_not_run(config, out_dir=None):
        raise AssertionError("the saved table should have been reused")

    again = load_or_run(must_not_run, cfg, tmp_path, "low_rank_weight_decay")
    pd.testing.assert_frame_equal(again, df)


def test_unknown_reference_model_is_a_usage_error():
    res = run_cli("reproduce", "nope")
    assert res.returncode == 2 and "invalid choice" in res.stderr


@pytest.mark.parametrize("command", ["compare", "fit"])
def test_compare_and_fit_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--out" in out and "--seed" in out or "--seeds" in out


def test_compare_impossible_setting_exits_2(tmp_path, capsys):
    code = cli.main(["compare", "--quick", "--epochs", "0", "--out", str(tmp_path)])
    assert code == cli.EXIT_USAGE
    assert "epochs must be a positive integer" in capsys.readouterr().err


def test_fit_resume_equals_uninterrupted(tmp_path, capsys):
    """fit 2 epochs, then --resume to 3 == a fresh 3-epoch run (bit for bit on CPU)."""
    import json

    common = ["fit", "--prior", "gaussian", "--method", "map", "--hidden", "8",
              "--batch-size", "128", "--lr", "0.03"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*common, "--epochs", "2", "--out", str(a)]) == 0
    assert (a / "checkpoint" / "checkpoint.pt").exists()
    assert cli.main([*common, "--epochs", "3", "--out", str(a), "--resume"]) == 0
    assert cli.main([*common, "--epochs", "3", "--out", str(b)]) == 0
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert ma["epochs_run"] == mb["epochs_run"] == 3
    assert ma == mb
    assert 0.5 < ma["accuracy"] <= 1.0
    assert "test accuracy" in capsys.readouterr().out
