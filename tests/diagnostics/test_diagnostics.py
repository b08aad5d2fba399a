"""analyze(): the xarray layer over the spectral metrics."""

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import bayes_spectral as bs


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Linear(72, 40)
        self.head = nn.Linear(40, 4)  # 4 eigenvalues: below min_evals
        self.extra = nn.Parameter(torch.randn(30, 20))
        self.bias_only = nn.Parameter(torch.randn(10))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def test_dataset_has_one_row_per_layer_with_coords(net):
    with pytest.warns(UserWarning, match="head"):
        ds = bs.analyze(net, include=["extra"])
    assert isinstance(ds, xr.Dataset)
    assert list(ds.layer.values) == ["conv", "fc1", "extra"]
    assert list(ds.layer_type.values) == ["Conv2d", "Linear", "Parameter"]
    assert list(ds["shape"].values) == ["8x3x3x3", "40x72", "30x20"]
    assert ds.attrs["skipped"] == "head"
    assert list(ds.num_evals.values) == [9 * 3, 40, 20]
    # values equal the array core
    m = bs.spectral_metrics(net.fc1.weight.detach().double())
    for key in ("alpha", "stable_rank", "log_norm", "alpha_weighted", "effective_rank"):
        assert float(ds[key].sel(layer="fc1")) == pytest.approx(float(m[key]), rel=1e-12)
    df = ds.to_dataframe()
    assert df.loc["fc1", "num_tail"] == int(m["num_tail"])


def test_return_esd_pads_with_nan(net):
    ds = bs.analyze(net, include=["extra"], return_esd=True, min_evals=2)
    assert ds.esd.dims == ("layer", "eval_index")
    assert ds.esd.shape == (4, 40)
    head = ds.esd.sel(layer="head").values
    assert np.isnan(head[4:]).all()
    np.testing.assert_allclose(head[:4], bs.esd(net.head.weight.detach().double()).numpy())


def test_layer_selection_by_pattern_and_names(net):
    ds = bs.analyze(net, layers=r"^fc")
    assert list(ds.layer.values) == ["fc1"]
    ds = bs.analyze(net, layers=["conv"])
    assert list(ds.layer.values) == ["conv"]
    with pytest.raises(ValueError, match="unknown layer names"):
        bs.analyze(net, layers=["nope"])
    with pytest.raises(ValueError, match="matches no weight layer"):
        bs.analyze(net, layers="zzz")
    with pytest.raises(ValueError, match="no parameter named"):
        bs.analyze(net, include=["missing"])
    with pytest.raises(ValueError, match="only 2-D"):
        bs.analyze(net, include=["bias_only"])


def test_state_dict_input_gives_same_numbers(net):
    ds_mod = bs.analyze(net, min_evals=2)
    ds_sd = bs.analyze(net.state_dict(), min_evals=2)
    assert list(ds_sd.layer.values) == ["conv", "fc1", "head"]
    np.testing.assert_allclose(ds_sd.alpha.values, ds_mod.alpha.values, rtol=1e-12)


def test_nan_weights_error_names_the_layer(net):
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc1.*NaN"):
        bs.analyze(net)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module or a state_dict"):
        bs.analyze([1, 2, 3])
