"""Hostile and careless input to the command line and the apps (issue 18, items 6, 7, 11).

Each case asserts the exit code, exactly one line on stderr, a message naming the file or
setting, and, where files are involved, that nothing already written was lost or changed.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bayes_spectral import cli
from bayes_spectral.apps import compare as C
from bayes_spectral.apps import outputs as O

TINY = ["compare", "--hidden", "8", "--epochs", "1", "--svi-epochs", "1", "--batch-size",
        "512", "--baselines", "none", "--priors", "gaussian", "--no-svi",
        "--sampler-epochs", "40"]  # 40 steps: compare's default (1000 full-batch) is slow
FIT = ["fit", "--prior", "gaussian", "--hidden", "8", "--epochs", "1", "--batch-size", "512"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")


def main(argv, capsys):
    """``(exit code, stdout, stderr lines)`` of ``cli.main(argv)`` (argparse exits too)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def one_line(err: list[str], pattern: str) -> None:
    assert len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]


def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("trained although the settings are impossible")

    monkeypatch.setattr(C, "train_baseline", boom)
    monkeypatch.setattr(C, "train_prior", boom)
    import bayes_spectral.bnn.fit as F

    monkeypatch.setattr(F, "fit", boom)


class Marker:
    """Unpickling creates the file ``path``: must never happen."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def evil_pickle(path: Path, marker: Path, wrap=lambda m: {"w": m}) -> None:
    with open(path, "wb") as fh:
        pickle.dump(wrap(Marker(marker)), fh)


# --------------------------------------------------------------------------------------
# item 6: seeds

SEED_CASES = [
    (["0", "0"], r"duplicate.*0"),
    (["0", "1", "0"], r"duplicate.*0"),
    (["4294967296"], r"seed.*4294967296.*range"),
    (["0", "4294967296"], r"seed.*4294967296.*range"),
    (["18446744073709551616"], r"seed.*range"),
    (["99999999999999999999999999"], r"seed.*range"),
    (["-1"], r"seed.*-1.*range"),
]


@pytest.mark.parametrize("seeds, pattern", SEED_CASES)
def test_compare_bad_seeds_exit_2(seeds, pattern, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    code, _, err = main([*TINY, "--out", tmp_path / "r", "--seeds", *seeds], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, pattern)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seeds, pattern", [
    ((0, 0), "duplicate"), ((3, 1, 3), "duplicate"), ((2**32,), "range"), ((2**70,), "range"),
    ((-5,), "range"), ((1.5,), "integer"), ((True,), "integer"), (("0",), "integer"),
])
def test_compare_config_rejects_seeds(seeds, pattern):
    with pytest.raises(ValueError, match=pattern):
        C.CompareConfig(seeds=seeds).validate()


@pytest.mark.parametrize("seed", ["4294967296", "-1", "18446744073709551616"])
def test_fit_bad_seed_exit_2(seed, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    code, _, err = main([*FIT, "--seed", seed, "--out", tmp_path / "f"], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, r"seed.*range")
    assert not (tmp_path / "f").exists()


# --------------------------------------------------------------------------------------
# item 11: --out, --device, impossible numbers: exit 2 before anything is trained or written


def _file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    return f


OUT_CASES = [
    ("file", lambda t: _file(t), r"--out.*afile.*not a folder"),
    ("under a file", lambda t: _file(t) / "sub", r"--out.*afile/sub.*not writable|not a folder"),
    ("proc", lambda t: Path("/proc/bayes-spectral-nope"), r"--out.*bayes-spectral-nope"),
]


@pytest.mark.parametrize("command", ["compare", "fit", "analyze", "reproduce"])
@pytest.mark.parametrize("kind, make, pattern", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_bad_out_exit_2_before_work(command, kind, make, pattern, tmp_path, capsys,
                                    monkeypatch):
    no_training(monkeypatch)
    import bayes_spectral.models as M

    import bayes_spectral.diagnostics.analyze as A

    monkeypatch.setattr(A, "analyze", lambda *a, **k: pytest.fail("analysed"))
    monkeypatch.setattr(M, "get_model", lambda *a, **k: pytest.fail("ran"))
    out = make(tmp_path)
    model = tmp_path / "m.pt"
    torch.save({"fc.weight": torch.randn(5, 4)}, model)
    argv = {"compare": TINY, "fit": FIT, "analyze": ["analyze", model],
            "reproduce": ["reproduce", "low_rank_weight_decay", "--small"]}[command]
    code, _, err = main([*argv, "--out", out], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, pattern)
    if (tmp_path / "afile").exists():
        assert (tmp_path / "afile").read_text() == "keep me"


DEVICES = [pytest.param("cuda", marks=NO_CUDA), pytest.param("cuda:3", marks=NO_CUDA),
           "bogus", "meta", "cpu:zero"]


@pytest.mark.parametrize("command", ["compare", "fit"])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_device_exit_2(command, device, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    argv = TINY if command == "compare" else FIT
    code, _, err = main([*argv, "--device", device, "--out", tmp_path / "o"], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, rf"device.*{re.escape(device)}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, name", [
    ("--epochs", "0", "epochs"), ("--epochs", "-2", "epochs"), ("--batch-size", "0", "batch"),
    ("--lr", "0", "lr"), ("--lr", "-1", "lr"), ("--lr", "inf", "lr"), ("--lr", "nan", "lr"),
    ("--hidden", "0", "hidden"), ("--num-samples", "0", "num.samples"),
    ("--chains", "0", "chains"),
])
def test_fit_impossible_setting_exit_2_writes_nothing(flag, value, name, tmp_path, capsys,
                                                      monkeypatch):
    no_training(monkeypatch)
    out = tmp_path / "f"
    code, _, err = main([*FIT, flag, value, "--out", out], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, name)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan")])
def test_compare_non_finite_lr_exit_2(flag, value, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    code, _, err = main([*TINY, flag, value, "--out", tmp_path / "r"], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, "lr")


# --------------------------------------------------------------------------------------
# item 11 and unclear items: analyze on bad files (exit 3), bad --layers (exit 2)


def _write(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    return path


def _truncated(path):
    torch.save({"fc.weight": torch.randn(20, 10)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


FILE_CASES = [
    ("empty .pt", "m.pt", lambda p: p.write_bytes(b""), r"m\.pt"),
    ("empty .safetensors", "m.safetensors", lambda p: p.write_bytes(b""), r"m\.safetensors"),
    ("truncated .pt", "m.pt", _truncated, r"m\.pt"),
    ("folder", "d.pt", lambda p: p.mkdir(), r"d\.pt"),
    ("list of tensors", "m.pt", lambda p: torch.save([torch.randn(3, 3)], p), r"m\.pt"),
    ("sparse coo", "m.pt", lambda p: torch.save(
        {"fc.weight": torch.randn(6, 5).to_sparse()}, p), r"fc\.weight.*sparse"),
    ("sparse csr", "m.pt", lambda p: torch.save(
        {"fc.weight": torch.randn(6, 5).to_sparse_csr()}, p), r"fc\.weight.*sparse"),
    ("meta", "m.pt", lambda p: torch.save(
        {"a.weight": torch.randn(6, 5), "fc.weight": torch.empty(6, 5, device="meta")}, p),
     r"fc\.weight.*meta"),
    ("nested meta", "m.pt", lambda p: torch.save(
        {"state_dict": {"fc.weight": torch.empty(6, 5, device="meta")}}, p), r"fc\.weight"),
]


@pytest.mark.parametrize("kind, name, make, pattern", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_analyze_bad_file_exit_3(kind, name, make, pattern, tmp_path, capsys):
    path = _write(tmp_path, name, make)
    code, _, err = main(["analyze", path], capsys)
    assert code == cli.EXIT_BAD_FILE
    one_line(err, pattern)


@pytest.mark.parametrize("wrap", [lambda m: {"w": m}, lambda m: {"state_dict": m}, lambda m: m,
                                  lambda m: [torch.zeros(2), m]])
def test_analyze_malicious_pickle_runs_nothing(wrap, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil_pickle(tmp_path / "evil.pt", marker, wrap)
    code, _, err = main(["analyze", tmp_path / "evil.pt"], capsys)
    assert code == cli.EXIT_BAD_FILE
    one_line(err, r"evil\.pt")
    assert not marker.exists()


@pytest.mark.parametrize("regex", ["(", "[", "*", "fc(", "a{2,1}"])
def test_analyze_bad_layers_regex_exit_2(regex, tmp_path, capsys):
    torch.save({"fc.weight": torch.randn(6, 5)}, tmp_path / "m.pt")
    code, _, err = main(["analyze", tmp_path / "m.pt", "--layers", regex], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, r"--layers.*" + re.escape(regex))


# --------------------------------------------------------------------------------------
# compare: runs are read safely; one compare per --out (lock); Ctrl-C keeps partial work


def _run_file(out: Path) -> Path:
    path = out / "runs" / "baseline_none_seed0.pt"
    path.parent.mkdir(parents=True)
    return path


RUN_CASES = [
    ("empty", lambda p, m: p.write_bytes(b"")),
    ("garbage", lambda p, m: p.write_bytes(b"\x80\x02garbage")),
    ("tensor", lambda p, m: torch.save(torch.zeros(3), p)),
    ("no rows", lambda p, m: torch.save({"weights": {}}, p)),
    ("evil", lambda p, m: evil_pickle(p, m)),
    ("evil nested", lambda p, m: evil_pickle(p, m, lambda x: {"rows": [x], "weights": {}})),
]


@pytest.mark.parametrize("kind, make", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_compare_bad_run_file_exit_3(kind, make, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    out, marker = tmp_path / "r", tmp_path / "PWNED"
    path = _run_file(out)
    make(path, marker)
    before = path.read_bytes()
    code, _, err = main([*TINY, "--seeds", "0", "--out", out], capsys)
    assert code == cli.EXIT_BAD_FILE
    one_line(err, r"baseline_none_seed0\.pt")
    assert not marker.exists()
    assert path.read_bytes() == before


def test_compare_corrupt_posterior_file_exit_3(tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    out = tmp_path / "r"
    path = _run_file(out)
    torch.save({"rows": [{"kind": "baseline", "method": "none", "seed": 0,
                          "test_accuracy": 0.5}], "weights": {}}, path)
    (path.parent / "baseline_none_seed0_svi.nc").write_bytes(b"CDF\x01 not netcdf")
    code, _, err = main([*TINY, "--seeds", "0", "--out", out], capsys)
    assert code == cli.EXIT_BAD_FILE
    one_line(err, r"baseline_none_seed0_svi\.nc")


def _hold_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / ".compare.lock", "w")  # noqa: SIM115 (held for the test)
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fh


def test_second_compare_on_one_out_exits_2(tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    fh = _hold_lock(tmp_path / "r")
    try:
        code, _, err = main([*TINY, "--seeds", "0", "--out", tmp_path / "r"], capsys)
    finally:
        fh.close()
    assert code == cli.EXIT_USAGE
    one_line(err, r"another.*compare.*\.compare\.lock")


def test_library_compare_refuses_a_locked_out(tmp_path, monkeypatch):
    no_training(monkeypatch)
    fh = _hold_lock(tmp_path / "r")
    try:
        with pytest.raises(RuntimeError, match=r"\.compare\.lock"):
            C.compare(C.CompareConfig(hidden=(8,), seeds=(0,)), out_dir=tmp_path / "r",
                      progress=None)
    finally:
        fh.close()


def test_compare_ctrl_c_exit_130_keeps_finished_runs(tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "train_prior", interrupt)
    out = tmp_path / "r"
    code, _, err = main([*TINY, "--seeds", "0", "--out", out], capsys)
    assert code == 130
    one_line(err, r"interrupted")
    saved = torch.load(out / "runs" / "baseline_none_seed0.pt", weights_only=True)
    assert saved["rows"][0]["method"] == "none"
    assert not list((out / "runs").glob(".*tmp*"))


@pytest.mark.parametrize("command", ["fit", "analyze"])
def test_ctrl_c_exit_130_one_line(command, tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    import bayes_spectral.bnn.fit as F
    import bayes_spectral.diagnostics.analyze as A

    monkeypatch.setattr(F, "fit", interrupt)
    monkeypatch.setattr(A, "analyze", interrupt)
    torch.save({"fc.weight": torch.randn(6, 5)}, tmp_path / "m.pt")
    argv = [*FIT, "--out", tmp_path / "f"] if command == "fit" else ["analyze", tmp_path / "m.pt"]
    code, _, err = main(argv, capsys)
    assert code == 130
    one_line(err, r"interrupted")


def test_fit_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "f"
    assert main([*FIT, "--method", "map", "--out", out], capsys)[0] == 0
    ckpt = out / "checkpoint" / "checkpoint.pt"
    before = {p.name: p.read_bytes() for p in (ckpt, out / "config.json", out / "metrics.json")}
    code, _, err = main([*FIT, "--method", "map", "--lr", "0.1", "--out", out], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, r"checkpoint\.pt.*--resume.*--overwrite")
    after = {p.name: p.read_bytes() for p in (ckpt, out / "config.json", out / "metrics.json")}
    assert after == before
    assert main([*FIT, "--method", "map", "--lr", "0.1", "--out", out, "--overwrite"],
                capsys)[0] == 0
    assert ckpt.read_bytes() != before["checkpoint.pt"]


# --------------------------------------------------------------------------------------
# item 7: every file the apps write goes through the atomic writer; a kill mid-write
# leaves the old file intact


def _fake_result(acc: float) -> dict:
    g = torch.Generator().manual_seed(0)
    w = {"fc1": torch.randn(8, 64, generator=g), "fc2": torch.randn(10, 8, generator=g)}
    rows = [{"kind": "baseline", "method": "none", "seed": s, "test_accuracy": acc,
             "nll": 1.0, "ece": 0.1, "seconds": 1.0, "alpha_fc1": 3.0, "stable_rank_fc1": 2.0,
             "alpha_fc2": 3.5, "stable_rank_fc2": 1.5} for s in (0, 1)]
    return {"table": pd.DataFrame(rows), "weights": {("baseline", "none", s): w for s in (0, 1)},
            "idata": {}, "config": C.CompareConfig(seeds=(0, 1), baselines=("none",),
                                                   priors=())}


class Killed(BaseException):
    """Stands for SIGKILL: raised after the serialiser has written half of its file."""


def _kill_when_writing(monkeypatch, owner, attr, stem, path_arg):
    orig = getattr(owner, attr)

    def writer(*args, **kw):
        target = path_arg(args, kw)
        result = orig(*args, **kw)
        if target is not None and Path(target).name.lstrip(".").startswith(stem):
            data = Path(target).read_bytes()
            Path(target).write_bytes(data[: len(data) // 2])
            raise Killed
        return result

    monkeypatch.setattr(owner, attr, writer)


def _csv_target(args, kw):
    return kw.get("path_or_buf", args[1] if len(args) > 1 else None)


def _savefig_target(args, kw):
    return args[1] if len(args) > 1 else kw.get("fname")


def _text_target(args, kw):
    return args[0] if args else None


def _netcdf_target(args, kw):
    return args[1] if len(args) > 1 else kw.get("path")


import matplotlib.figure  # noqa: E402
import xarray as xr  # noqa: E402

KILL_CASES = [
    ("results.csv", pd.DataFrame, "to_csv", "results", _csv_target),
    ("summary.csv", pd.DataFrame, "to_csv", "summary", _csv_target),
    ("baselines.nc", xr.Dataset, "to_netcdf", "baselines", _netcdf_target),
    ("esd_fc1.png", matplotlib.figure.Figure, "savefig", "esd_fc1", _savefig_target),
    ("alpha_vs_accuracy.png", matplotlib.figure.Figure, "savefig", "alpha_vs", _savefig_target),
]


@pytest.mark.parametrize("name, owner, attr, stem, target", KILL_CASES,
                         ids=[c[0] for c in KILL_CASES])
def test_kill_during_write_outputs_keeps_old_file(name, owner, attr, stem, target, tmp_path,
                                                  monkeypatch):
    O.write_outputs(_fake_result(0.5), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert name in before
    _kill_when_writing(monkeypatch, owner, attr, stem, target)
    with pytest.raises(Killed):
        O.write_outputs(_fake_result(0.9), tmp_path)
    assert (tmp_path / name).read_bytes() == before[name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary left


def test_kill_during_text_write_keeps_old_file(tmp_path, monkeypatch):
    import bayes_spectral._io as io

    io.write_text_atomic(tmp_path / "config.json", '{"old": 1}')
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        io.write_text_atomic(tmp_path / "config.json", '{"new": 2}')
    assert (tmp_path / "config.json").read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("name, owner, attr, stem, target", [
    ("analysis.csv", pd.DataFrame, "to_csv", "analysis", _csv_target),
    ("esd.png", matplotlib.figure.Figure, "savefig", "esd", _savefig_target),
], ids=["analysis.csv", "esd.png"])
def test_kill_during_analyze_out_keeps_old_file(name, owner, attr, stem, target, tmp_path,
                                                capsys, monkeypatch):
    torch.save({"fc.weight": torch.randn(30, 20)}, tmp_path / "m.pt")
    out = tmp_path / "o"
    assert main(["analyze", tmp_path / "m.pt", "--out", out], capsys)[0] == 0
    before = (out / name).read_bytes()
    torch.save({"fc.weight": torch.randn(30, 20) * 3}, tmp_path / "m.pt")
    _kill_when_writing(monkeypatch, owner, attr, stem, target)
    with pytest.raises(Killed):
        cli.main(["analyze", str(tmp_path / "m.pt"), "--out", str(out)])
    assert (out / name).read_bytes() == before


def test_atomic_path_keeps_the_suffix(tmp_path):
    """Writers that infer the format from the name (savefig, to_netcdf) see the suffix."""
    import bayes_spectral._io as io

    with io.atomic_path(tmp_path / "plot.png") as tmp:
        assert str(tmp).endswith(".png")
        Path(tmp).write_bytes(b"x")
    assert (tmp_path / "plot.png").read_bytes() == b"x"
    assert np.array_equal(sorted(os.listdir(tmp_path)), ["plot.png"])


@pytest.mark.parametrize("argv", [["analyze", "--example", "digits-mlp", "--seed", "-1"],
                                  ["analyze", "--example", "digits-mlp", "--seed", "4294967296"],
                                  ["reproduce", "low_rank_weight_decay", "--small", "--seed",
                                   "-3"]])
def test_other_bad_seeds_exit_2(argv, capsys, monkeypatch):
    import bayes_spectral.models as M

    monkeypatch.setattr(cli, "_example_model", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(M, "get_model", lambda *a, **k: pytest.fail("ran"))
    code, _, err = main(argv, capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, r"--seed.*range")


@pytest.mark.parametrize("error, code", [
    ("unreadable", cli.EXIT_BAD_FILE), ("changed setting", cli.EXIT_USAGE)])
def test_fit_resume_refused_keeps_config(error, code, tmp_path, capsys, monkeypatch):
    """A checkpoint ``fit`` refuses (unsafe file: exit 3; other settings: exit 2) leaves the
    earlier ``config.json`` as it was (it is written only once ``fit`` accepted the run)."""
    import bayes_spectral.bnn.fit as F
    from bayes_spectral._io import UnreadableFileError

    out = tmp_path / "f"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "checkpoint.pt").write_bytes(b"old checkpoint")
    (out / "config.json").write_text('{"lr": 0.003}')

    def refuse(*a, **k):
        path = out / "checkpoint" / "checkpoint.pt"
        if error == "unreadable":
            raise UnreadableFileError(f"{path}: cannot be loaded safely")
        raise ValueError(f"{path}: made with lr 0.003, now 0.1; pass --overwrite")

    monkeypatch.setattr(F, "fit", refuse)
    got, _, err = main([*FIT, "--lr", "0.1", "--out", out, "--resume"], capsys)
    assert got == code
    one_line(err, r"checkpoint\.pt")
    assert (out / "config.json").read_text() == '{"lr": 0.003}'
    assert (out / "checkpoint" / "checkpoint.pt").read_bytes() == b"old checkpoint"


# --------------------------------------------------------------------------------------
# item 2 (compare's part): runs saved with other settings are refused by name, before
# anything trains or any report file is written


@pytest.fixture(scope="module")
def small_split():
    import bayes_spectral as bs
    from bayes_spectral.data import Split

    d = bs.data.load_digits()
    return Split(d.x_train[:128], d.y_train[:128], d.x_test[:64], d.y_test[:64])


@pytest.mark.parametrize("flag, value, pattern", [
    ("--epochs", "2", r"epochs 1 \(now 2\)"),
    ("--hidden", "6", r"hidden \[8\] \(now \[6\]\)"),
    ("--lr", "0.01", r"lr 0\.003 \(now 0\.01\)"),
    ("--batch-size", "64", r"batch_size 512 \(now 64\)"),
    ("--dataset", "mnist1d", r"dataset 'digits' \(now 'mnist1d'\)"),
])
def test_compare_refuses_runs_of_other_settings(flag, value, pattern, tmp_path, capsys,
                                                monkeypatch, small_split):
    monkeypatch.setattr(C, "load_dataset", lambda name, seed=0: small_split)
    out = tmp_path / "r"
    base = [*TINY, "--seeds", "0", "--out", out]
    assert main(base, capsys)[0] == 0
    run = out / "runs" / "baseline_none_seed0.pt"
    before = {p.name: p.read_bytes() for p in (run, out / "config.json", out / "results.csv")}
    no_training(monkeypatch)
    code, _, err = main([*base, flag, value], capsys)
    assert code == cli.EXIT_USAGE
    one_line(err, r"baseline_none_seed0\.pt.*other settings.*" + pattern + r".*--no-resume")
    after = {p.name: p.read_bytes() for p in (run, out / "config.json", out / "results.csv")}
    assert after == before


def test_compare_same_settings_resume_and_old_runs_refused(tmp_path, monkeypatch, small_split):
    monkeypatch.setattr(C, "load_dataset", lambda name, seed=0: small_split)
    cfg = C.CompareConfig(hidden=(8,), seeds=(0,), epochs=1, batch_size=512,
                          baselines=("none",), priors=())
    first = C.compare(cfg, out_dir=tmp_path, progress=None)["table"]
    no_training(monkeypatch)
    pd.testing.assert_frame_equal(C.compare(cfg, out_dir=tmp_path, progress=None)["table"],
                                  first)
    run = tmp_path / "runs" / "baseline_none_seed0.pt"
    saved = torch.load(run, weights_only=True)
    assert saved["fingerprint"] == {"dataset": "digits", "hidden": [8], "epochs": 1,
                                    "batch_size": 512, "lr": 3e-3, "coef": 0.0}
    del saved["fingerprint"]
    torch.save(saved, run)
    with pytest.raises(C.SettingsMismatchError, match="saved without its settings"):
        C.compare(cfg, out_dir=tmp_path, progress=None)
