"""Plots: PNGs of the expected size and axes, drawing the fitted law that fit_powerlaw gives."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.image import imread  # noqa: E402

import bayes_spectral as bs  # noqa: E402
from bayes_spectral.plots import plot_esd, plot_esds  # noqa: E402


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
