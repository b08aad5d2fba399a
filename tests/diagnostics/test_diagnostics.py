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
    # issue 17: rows of the parameter view, in state_dict order (the model's own parameters
    # first), kinds read from names and shapes (so a state_dict gives the same dataset)
    assert list(ds.layer.values) == ["extra", "conv", "fc1"]
    assert list(ds.layer_type.values) == ["Param2d", "Conv2d", "Matrix"]
    assert list(ds["shape"].values) == ["30x20", "8x3x3x3", "40x72"]
    assert ds.attrs["skipped"] == "head"
    assert list(ds.num_evals.values) == [20, 9 * 3, 40]
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
    ds = bs.analyze(net, layers=r"fc.*")  # issue 17: the one rule, re.fullmatch
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
    assert list(ds_sd.layer.values) == ["extra", "conv", "fc1", "head"]
    np.testing.assert_allclose(ds_sd.alpha.values, ds_mod.alpha.values, rtol=1e-12)


def test_nan_weights_error_names_the_layer(net):
    """Issue 18: a bad layer is reported (warning naming it) and left out, not fatal."""
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="fc1.*NaN"):
        ds = bs.analyze(net, min_evals=2)
    assert "fc1" not in list(ds.layer.values)
    assert "fc1: could not be analysed" in ds.attrs["left_out"]


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module or a state_dict"):
        bs.analyze([1, 2, 3])


# --- issue 17: every weight of any architecture, model == state_dict ------------------------


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32)
        self.lstm = nn.LSTM(16, 12)
        self.gru = nn.GRU(12, 10)
        self.bn = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 1)  # 1 eigenvalue: skipped with its reason


@pytest.fixture
def zoo():
    torch.manual_seed(0)
    return Zoo().eval()


def test_analyze_covers_embedding_attention_and_recurrent_weights(zoo):
    with pytest.warns(UserWarning, match=r"head \(1 eigenvalues \(< min_evals=8\)\)"):
        ds = bs.analyze(zoo)
    assert list(ds.layer.values) == [
        "emb", "enc.self_attn.in_proj_weight[q]", "enc.self_attn.in_proj_weight[k]",
        "enc.self_attn.in_proj_weight[v]", "enc.self_attn.out_proj", "enc.linear1",
        "enc.linear2", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "gru.weight_ih_l0",
        "gru.weight_hh_l0"]
    assert list(ds.layer_type.values[:5]) == ["Matrix", "AttnQ", "AttnK", "AttnV", "AttnOut"]
    assert ds.attrs["skipped"] == "head"
    assert "bn.weight: a 1-D weight, not a matrix" in ds.attrs["left_out"]
    # the Q block is the first E rows of in_proj_weight
    w_q = zoo.enc.self_attn.in_proj_weight[:16].detach().double()
    m = bs.spectral_metrics(w_q)
    assert float(ds.alpha.sel(layer="enc.self_attn.in_proj_weight[q]")) == pytest.approx(
        float(m["alpha"]), rel=1e-12)
    assert int(ds.num_evals.sel(layer="lstm.weight_hh_l0")) == 12


def test_analyze_of_a_model_equals_analyze_of_its_state_dict(zoo):
    with pytest.warns(UserWarning, match="head"):
        ds_mod = bs.analyze(zoo, return_esd=True)
    with pytest.warns(UserWarning, match="head"):
        ds_sd = bs.analyze(zoo.state_dict(), return_esd=True)
    xr.testing.assert_identical(ds_mod, ds_sd)  # bit for bit, coords and attrs included


def test_analyze_selection_uses_the_one_rule(zoo):
    ds = bs.analyze(zoo, layers="enc.self_attn.*")
    assert list(ds.layer.values) == [
        "enc.self_attn.in_proj_weight[q]", "enc.self_attn.in_proj_weight[k]",
        "enc.self_attn.in_proj_weight[v]", "enc.self_attn.out_proj"]
    ds = bs.analyze(zoo, types=(nn.LSTM, nn.GRU), split_gates=True)
    assert list(ds.layer.values)[:4] == [f"lstm.weight_ih_l0[{g}]" for g in "ifgo"]
    ds = bs.analyze(zoo, hide=nn.Embedding, layers="emb|enc.linear1")
    assert list(ds.layer.values) == ["enc.linear1"]
    assert "emb: type Embedding is hidden" in ds.attrs["left_out"]
