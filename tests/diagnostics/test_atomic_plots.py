"""Plots and reference-model results are written atomically: a write interrupted half-way
leaves the file that was there before byte for byte, and no temporary file behind."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bayes_spectral.models._common import write_results  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bayes_spectral.diagnostics.plots import plot_esds  # noqa: E402


def _interrupting_savefig(real):
    """Write the real PNG, cut it in half, then fail as a kill mid-write would."""

    def savefig(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        with open(path, "r+b") as fh:
            fh.truncate(max(1, fh.seek(0, 2) // 2))
        raise KeyboardInterrupt("killed while writing")

    return savefig


def _spectra():
    torch.manual_seed(0)
    return {"fc1": torch.linalg.svdvals(torch.randn(40, 30)).square()}


def test_interrupted_plot_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "esd.png"
    plot_esds(_spectra(), path=path)
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(Figure, "savefig", _interrupting_savefig(Figure.savefig))
    with pytest.raises(KeyboardInterrupt):
        plot_esds(_spectra(), path=path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esd.png"]


def test_interrupted_reference_results_keep_the_old_files(tmp_path):
    df = pd.DataFrame({"seed": [0, 1], "acc": [0.9, 0.8]})

    def plot(frame, path):
        path.write_bytes(b"png:" + frame.to_csv().encode())

    write_results(df, tmp_path, "claim", plot)
    csv, png = (tmp_path / "claim.csv").read_bytes(), (tmp_path / "claim.png").read_bytes()
    assert csv.startswith(b"seed,acc")

    def broken_plot(frame, path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        write_results(df.assign(acc=[0.1, 0.2]), tmp_path, "claim", broken_plot)
    assert (tmp_path / "claim.png").read_bytes() == png
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claim.csv", "claim.png"]
    assert (tmp_path / "claim.csv").read_bytes() != csv  # the CSV itself finished first
