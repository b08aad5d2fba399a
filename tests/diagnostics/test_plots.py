"""Plots: PNGs of the expected size and axes, drawing the fitted law that fit_powerlaw gives."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.image import imread  # noqa: E402

import bayes_spectral as bs  # noqa: E402
from bayes_spectral.diagnostics.plots import plot_esd, plot_esds  # noqa: E402


def test_plot_esd_draws_ccdf_fit_and_xmin():
    torch.manual_seed(0)
    ev = bs.esd(torch.distributions.StudentT(3.0).sample((200, 100)).double())
    fit = bs.fit_powerlaw(ev)
    ax = plot_esd(ev, fit)
    points, law, vline = ax.lines
    # empirical CCDF: N points from 1 down to 1/N
    np.testing.assert_allclose(points.get_ydata()[[0, -1]], [1.0, 1 / 100])
    # the drawn law starts at (xmin, n_tail/N) with slope 1 - alpha on log-log axes
    x, y = law.get_xdata(), law.get_ydata()
    assert x[0] == pytest.approx(float(fit.xmin))
    assert y[0] == pytest.approx(int(fit.num_tail) / 100)
    slope = np.log(y[-1] / y[0]) / np.log(x[-1] / x[0])
    assert slope == pytest.approx(1 - float(fit.alpha), rel=1e-9)
    assert vline.get_xdata()[0] == pytest.approx(float(fit.xmin))
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    plt.close("all")


def test_plot_esds_writes_png_with_one_panel_per_layer(tmp_path):
    torch.manual_seed(1)
    spectra = {f"l{i}": bs.esd(torch.randn(60 + 10 * i, 40, dtype=torch.float64))
               for i in range(4)}
    fig = plot_esds(spectra, ncols=3)
    assert len(fig.axes) == 4
    assert [a.get_title() for a in fig.axes] == [f"layer l{i}" for i in range(4)]
    path = tmp_path / "esd.png"
    plot_esds(spectra, path, ncols=3)
    img = imread(path)
    assert img.shape[:2] == (760, 1500)  # 2 rows x 3.8 in, 3 cols x 5 in, at 100 dpi
    with pytest.raises(ValueError, match="at least one"):
        plot_esds({})
    plt.close("all")


# --- posterior spectra -----------------------------------------------------------------


def _posterior_and_baselines():
    from torch import nn

    torch.manual_seed(2)
    shapes = {"0": (16, 12), "2": (10, 16), "4": (3, 10)}
    weights = {k: torch.randn(1, 1, *s, dtype=torch.float64) + 0.1 * torch.randn(2, 40, *s,
                                                                                dtype=torch.float64)
               for k, s in shapes.items()}
    post = bs.spectral_draws(weights)

    def net(seed, scale):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(),
                          nn.Linear(10, 3))
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
        return m

    base = bs.baseline_dataset({(m, s): net(s, scale) for m, scale in
                                (("none", 1.0), ("weight_decay", 0.5)) for s in range(3)})
    return post, base


def test_plot_posterior_spectra_png_axes_and_median(tmp_path):
    from bayes_spectral.diagnostics.plots import plot_posterior_spectra

    post, base = _posterior_and_baselines()
    path = tmp_path / "spectra.png"
    fig = plot_posterior_spectra(post, base, hdi_prob=0.9, path=path)
    assert len(fig.axes) == 3
    assert imread(path).shape[:2] == (380, 1500)  # 1 row x 3.8 in, 3 cols x 5 in, 100 dpi
    ax = fig.axes[1]
    assert ax.get_yscale() == "log" and ax.get_title() == "layer 2: posterior spectrum"
    median, none, wd = ax.lines
    sv = post["singular_values"].sel(layer="2").values.reshape(80, -1)[:, :10]
    np.testing.assert_allclose(median.get_ydata(), np.median(sv, axis=0))
    expect = base["singular_values"].sel({"layer": "2", "method": "none"}).values[:, :10]
    np.testing.assert_allclose(none.get_ydata(), expect.mean(0))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "posterior 90% HDI" and "weight_decay (mean of 3 seeds)" in labels
    fig2 = plot_posterior_spectra(post, layers=["4"])
    assert len(fig2.axes) == 1 and len(fig2.axes[0].lines) == 1  # no baselines
    with pytest.raises(ValueError, match="unknown layers"):
        plot_posterior_spectra(post, layers=["9"])
    plt.close("all")


def test_plot_spectral_forest_rows_and_png(tmp_path):
    from bayes_spectral.diagnostics.plots import plot_spectral_forest

    post, base = _posterior_and_baselines()
    path = tmp_path / "forest.png"
    fig = plot_spectral_forest({"prior A": post, "prior B": post}, base, path=path)
    assert len(fig.axes) == 3
    rows = 3 * (2 + 2)  # layers x (2 posteriors + 2 baseline methods)
    w, h = fig.get_size_inches()
    assert (w, h) == pytest.approx((12.6, 1.4 + 0.32 * rows))
    assert imread(path).shape[:2] == (round(100 * h), round(100 * w))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[:4] == ["0 | prior A", "0 | prior B", "0 | none", "0 | weight_decay"]
    assert [a.get_title() for a in fig.axes] == ["alpha", "lambda_max", "stable_rank"]
    assert fig.axes[1].get_xscale() == "log"
    fig = plot_spectral_forest(post, var_names=("stable_rank",))
    assert len(fig.axes) == 1 and len(fig.axes[0].get_yticks()) == 3
    with pytest.raises(ValueError, match="not in a dataset"):
        plot_spectral_forest(post, var_names=("nope",))
    plt.close("all")


def test_plot_alpha_vs_accuracy_one_axis_per_layer(tmp_path):
    import pandas as pd

    from bayes_spectral.diagnostics.plots import plot_alpha_vs_accuracy

    rng = np.random.default_rng(0)
    table = pd.DataFrame([dict(method=m, seed=s, layer=layer, alpha=2 + rng.random(),
                               test_accuracy=0.9 + 0.05 * rng.random())
                          for m in ("none", "weight_decay", "spectral_norm")
                          for s in range(4) for layer in ("fc1", "fc2")])
    path = tmp_path / "alpha.png"
    fig = plot_alpha_vs_accuracy(table, path=path)
    assert len(fig.axes) == 2
    # 3.8 in per row of axes + 0.35 + 0.2 in per legend row (one shared legend below), 100 dpi
    assert imread(path).shape[:2] == (435, 1000)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["none (4 runs)", "weight_decay (4 runs)", "spectral_norm (4 runs)"]
    ax = fig.axes[0]
    assert len(ax.collections) == 3 and ax.get_title() == "layer fc1"
    pts = ax.collections[1].get_offsets()
    sub = table[(table.layer == "fc1") & (table.method == "weight_decay")]
    np.testing.assert_allclose(pts, sub[["alpha", "test_accuracy"]].to_numpy())
    with pytest.raises(ValueError, match="missing"):
        plot_alpha_vs_accuracy(table.drop(columns="alpha"))
    plt.close("all")
