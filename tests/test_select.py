"""select.py: the one parameter view, its one selection rule, and every caller on it.

One model with the module kinds that tell callers apart: Linear, Conv2d, BatchNorm
(1-D weight), Embedding (2-D weight, not Linear), MultiheadAttention (fused
``in_proj_weight`` plus an ``out_proj`` that subclasses Linear) and LSTM (no ``weight``).
"""

import warnings

import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral import select as S
from bayes_spectral.bnn.row_keys import pick_row_union, resolve_row_keys, rows_for_key
from bayes_spectral.distributions import GaussianSpectrum
from bayes_spectral.penalties import Regularizer, WeightDecay
from bayes_spectral.penalties.base import weight_layers_of


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.attn = nn.MultiheadAttention(6, 2)
        self.lstm = nn.LSTM(6, 5)
        self.fc = nn.Linear(5, 3)
        self.head = nn.Linear(3, 2)
        self.act = nn.ReLU()


VIEW_ROWS = ["emb", "conv", "attn.in_proj_weight[q]", "attn.in_proj_weight[k]",
             "attn.in_proj_weight[v]", "attn.out_proj", "lstm.weight_ih_l0",
             "lstm.weight_hh_l0", "fc", "head"]
VIEW_KINDS = ["Matrix", "Conv2d", "AttnQ", "AttnK", "AttnV", "AttnOut", "RecurrentIH",
              "RecurrentHH", "Matrix", "Matrix"]


@pytest.fixture
def zoo():
    torch.manual_seed(0)
    return Zoo()


def _view_rows(model):
    return S.parameter_view(model).rows


# --- every caller takes the rows of the parameter view ------------------------------------


def test_weight_layers_are_the_rows_of_the_view(zoo):
    assert bs.weight_layers is S.weight_layers
    rows = S.weight_layers(zoo)
    assert [(n, k) for n, k, _ in rows] == list(zip(VIEW_ROWS, VIEW_KINDS, strict=True))
    fc = rows[VIEW_ROWS.index("fc")][2]
    assert torch.equal(fc, zoo.fc.weight) and not fc.requires_grad
    assert fc.data_ptr() == zoo.fc.weight.data_ptr()  # detached, not copied
    k = rows[VIEW_ROWS.index("attn.in_proj_weight[k]")][2]
    assert torch.equal(k, zoo.attn.in_proj_weight[6:12])
    # a model and its state_dict give equal rows, bit for bit
    sd = S.weight_layers(zoo.state_dict())
    assert [r[:2] for r in sd] == [r[:2] for r in rows]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(rows, sd, strict=True))


def test_weight_layers_select_by_the_one_rule(zoo):
    def names(layers, model=zoo):
        return [n for n, _, _ in S.weight_layers(model, layers)]

    # a regular expression: re.fullmatch on module, parameter or row name (was re.search)
    with pytest.raises(ValueError, match=r"weight_layers\(\): pattern 'out' matches no layer"):
        names("out")
    assert names(".*out.*") == ["attn.out_proj"]
    assert names("attn") == VIEW_ROWS[2:5]  # the module's own in_proj rows
    assert names(r"attn\..*") == VIEW_ROWS[2:6]
    assert names(r"lstm\.weight_hh_l0", zoo.state_dict()) == ["lstm.weight_hh_l0"]
    # exact names, kept in row order: row, parameter or module names
    assert names(["head", "fc"]) == ["fc", "head"]
    assert names(["fc.weight", "lstm"]) == VIEW_ROWS[6:9]
    assert names(("head",), zoo.state_dict()) == ["head"]
    with pytest.raises(ValueError, match=r"unknown layer names \['nope'\]"):
        names(["nope"])
    with pytest.raises(ValueError, match=r"without a >= 2-D weight: \['bn'\]"):
        names(["bn"])
    with pytest.raises(ValueError, match=r"'fc\[' is not a valid regular expression"):
        names("fc[")
    with pytest.raises(TypeError, match="nn.Module or a state_dict"):
        S.weight_layers([zoo.fc.weight])


def test_penalty_policy_takes_every_row_of_the_view(zoo):
    # issue 17: the penalties use the parameter view (was: Linear/Conv weights only)
    assert [n for n, _ in weight_layers_of(zoo)] == VIEW_ROWS
    assert weight_layers_of(nn.Linear(3, 3))[0][0] == "<root>"


def test_regularizer_policy(zoo):
    # issue 17: every row of the parameter view, and the one regex rule (re.fullmatch;
    # was re.search, so pattern="e" selected "emb" and "head")
    assert list(Regularizer(zoo, WeightDecay()).layers) == VIEW_ROWS
    assert list(Regularizer(zoo, WeightDecay(), pattern="e.*").layers) == ["emb"]
    assert list(Regularizer(zoo, WeightDecay(), pattern="attn.*").layers) == VIEW_ROWS[2:6]
    assert list(Regularizer(zoo, WeightDecay(), types=nn.Embedding).layers) == ["emb"]
    with pytest.raises(ValueError, match=r"without a >= 2-D weight: \['bn'\]"):
        Regularizer(zoo, WeightDecay(), names=["bn"])
    # the model itself is a row named "<root>", selectable by that name
    assert list(Regularizer(nn.Linear(2, 2), WeightDecay(), names="<root>").layers) == [
        "<root>"]


def test_compare_snapshot_is_the_linear_rows_by_module_name(zoo):
    from bayes_spectral.apps import compare as C

    weights = C._weights_of(zoo)
    assert list(weights) == ["attn.out_proj", "fc", "head"]
    assert torch.equal(weights["fc"], zoo.fc.weight) and not weights["fc"].requires_grad
    assert weights["fc"].data_ptr() != zoo.fc.weight.data_ptr()  # a clone
    root = nn.Linear(2, 2)
    assert list(C._weights_of(root)) == [""]  # the root named ""
    # a parametrized Linear: its effective weight
    nn.utils.parametrizations.orthogonal(zoo.fc)
    torch.testing.assert_close(C._weights_of(zoo)["fc"], zoo.fc.weight.detach())


# --- one regex rule for every caller ---------------------------------------------------------


def test_callers_share_the_fullmatch_rule(zoo):
    rows = _view_rows(zoo)
    with pytest.raises(ValueError, match="'out' matches no layer"):
        Regularizer(zoo, WeightDecay(), pattern="out")
    assert list(Regularizer(zoo, WeightDecay(), pattern=".*out.*").layers) == ["attn.out_proj"]
    # bayesian's keys (bnn.row_keys): the same rule
    with pytest.raises(ValueError, match="'out' is not a layer name and matches no layer"):
        rows_for_key("out", rows, "priors")
    assert rows_for_key(".*out.*", rows, "priors") == (["attn.out_proj"], 1)
    assert rows_for_key(r"attn\..*", rows, "priors") == (VIEW_ROWS[2:6], 1)


def test_bad_regex_is_a_value_error_naming_it(zoo):
    rows = _view_rows(zoo)
    with pytest.raises(ValueError, match=r"priors: 'fc\[' is neither a layer name nor a valid"):
        rows_for_key("fc[", rows, "priors")
    with pytest.raises(ValueError, match=r"'fc\[' is not a valid regular expression"):
        Regularizer(zoo, WeightDecay(), pattern="fc[")
    with pytest.raises(ValueError, match=r"'fc\[' is not a valid regular expression"):
        S.weight_layers(zoo, "fc[")


# --- bayesian's keys: exact name > regex > type (bnn.row_keys on the view) ------------------


def test_precedence_exact_over_regex_over_type(zoo):
    rows = _view_rows(zoo)
    keyed = {nn.Linear: "by type", r"h.*": "by regex", "fc": "by name"}
    assert resolve_row_keys(keyed, rows, "priors") == {
        "attn.out_proj": "by type", "fc": "by name", "head": "by regex"}
    # the order of the keys does not matter
    reordered = dict(reversed(list(keyed.items())))
    assert resolve_row_keys(reordered, rows, "priors") == resolve_row_keys(keyed, rows, "priors")
    # None keeps a layer out, whatever matched it at lower precedence
    assert "fc" not in resolve_row_keys({nn.Linear: 1, "fc": None}, rows, "priors")
    with pytest.raises(ValueError, match="'fc' is matched by two keys of the same kind"):
        resolve_row_keys({r"f.*": 1, r"fc|head": 2}, rows, "priors")


def test_pick_union_and_errors(zoo):
    rows = _view_rows(zoo)
    assert pick_row_union(None, rows, "spectral") == []
    assert pick_row_union(True, rows, "spectral") == VIEW_ROWS
    assert pick_row_union(["head", nn.Linear], rows, "spectral") == [
        "head", "attn.out_proj", "fc"]
    with pytest.raises(ValueError, match="spectral: no layer of type Conv1d"):
        pick_row_union(nn.Conv1d, rows, "spectral")
    with pytest.raises(TypeError, match="is not a torch.nn.Module type"):
        pick_row_union(int, rows, "spectral")
    with pytest.raises(TypeError, match="chosen by type, name or regex"):
        pick_row_union([3], rows, "spectral")


def test_bayesian_rejects_keys_of_the_same_kind_with_different_priors():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))

    def narrow(shape):
        return GaussianSpectrum(1.0, shape)

    def wide(shape):
        return GaussianSpectrum(2.0, shape)

    with pytest.raises(ValueError, match="priors: layer '0' is matched by two keys of the same"):
        bs.bayesian(net, {r"0|1": narrow, r"[0]": wide}, num_data=8)
    # the same value under both keys is no conflict
    bn = bs.bayesian(net, {r"0|1": narrow, r"[0]": narrow}, num_data=8)
    assert sorted(bn.prior_sites) == ["0", "1"]


# --- issue 17: the parameter view, every weight of any architecture -------------------------


class Every(nn.Module):
    """One of each kind: Linear, grouped Conv2d, BatchNorm, Embedding tied to the head,
    a TransformerEncoderLayer (fused in_proj), an MHA with kdim != embed_dim (separate
    q/k/v), LSTM, GRU and a weight_norm-parametrized Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(4, 6, 3, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16)
        self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
        self.lstm = nn.LSTM(8, 4)
        self.gru = nn.GRU(8, 3)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(8, 5))
        self.fc = nn.Linear(8, 7)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight


EVERY_ROWS = [  # name, kind, param_name, module_name, attr, index, shape
    ("emb", "Matrix", "emb.weight", "emb", "weight", None, (20, 8)),
    ("conv", "Conv2d", "conv.weight", "conv", "weight", None, (6, 2, 3, 3)),
    ("enc.self_attn.in_proj_weight[q]", "AttnQ", "enc.self_attn.in_proj_weight",
     "enc.self_attn", "in_proj_weight", slice(0, 8), (8, 8)),
    ("enc.self_attn.in_proj_weight[k]", "AttnK", "enc.self_attn.in_proj_weight",
     "enc.self_attn", "in_proj_weight", slice(8, 16), (8, 8)),
    ("enc.self_attn.in_proj_weight[v]", "AttnV", "enc.self_attn.in_proj_weight",
     "enc.self_attn", "in_proj_weight", slice(16, 24), (8, 8)),
    ("enc.self_attn.out_proj", "AttnOut", "enc.self_attn.out_proj.weight",
     "enc.self_attn.out_proj", "weight", None, (8, 8)),
    ("enc.linear1", "Matrix", "enc.linear1.weight", "enc.linear1", "weight", None, (16, 8)),
    ("enc.linear2", "Matrix", "enc.linear2.weight", "enc.linear2", "weight", None, (8, 16)),
    ("mha.q_proj_weight", "AttnQ", "mha.q_proj_weight", "mha", "q_proj_weight", None, (8, 8)),
    ("mha.k_proj_weight", "AttnK", "mha.k_proj_weight", "mha", "k_proj_weight", None, (8, 6)),
    ("mha.v_proj_weight", "AttnV", "mha.v_proj_weight", "mha", "v_proj_weight", None, (8, 5)),
    ("mha.out_proj", "AttnOut", "mha.out_proj.weight", "mha.out_proj", "weight", None, (8, 8)),
    ("lstm.weight_ih_l0", "RecurrentIH", "lstm.weight_ih_l0", "lstm", "weight_ih_l0", None,
     (16, 8)),
    ("lstm.weight_hh_l0", "RecurrentHH", "lstm.weight_hh_l0", "lstm", "weight_hh_l0", None,
     (16, 4)),
    ("gru.weight_ih_l0", "RecurrentIH", "gru.weight_ih_l0", "gru", "weight_ih_l0", None, (9, 8)),
    ("gru.weight_hh_l0", "RecurrentHH", "gru.weight_hh_l0", "gru", "weight_hh_l0", None, (9, 3)),
    ("wn", "Matrix", "wn.weight", "wn", "weight", None, (5, 8)),
    ("fc", "Matrix", "fc.weight", "fc", "weight", None, (7, 8)),
]


@pytest.fixture
def every():
    torch.manual_seed(0)
    return Every().eval()


def _rows(view):
    return [(r.name, r.kind, r.param_name, r.module_name, r.attr, r.index, r.shape)
            for r in view.rows]


def test_view_has_every_weight_and_says_what_it_left_out(every):
    with pytest.warns(UserWarning, match=r"grouped convolutions \['conv'\]"):
        view = S.parameter_view(every)
    assert _rows(view) == EVERY_ROWS
    rows = view.by_name()
    assert rows["emb"].tied == ("head.weight",)
    assert rows["wn"].module_type == "Linear" and rows["mha.out_proj"].module is every.mha.out_proj
    reasons = dict(view.left_out)
    assert reasons["head.weight"] == "tied to emb.weight"
    assert reasons["bn.weight"] == "a 1-D weight, not a matrix"
    assert reasons["enc.norm1.weight"] == "a 1-D weight, not a matrix"
    assert "fc.bias" not in reasons and "bn.running_mean" not in reasons
    # values: the slice of the fused tensor, the effective parametrized weight
    assert torch.equal(rows["enc.self_attn.in_proj_weight[k]"].read(),
                       every.enc.self_attn.in_proj_weight[8:16])
    assert torch.equal(rows["wn"].read(), every.wn.weight)
    assert rows["wn"].leaves() == [every.wn.parametrizations.weight.original0,
                                   every.wn.parametrizations.weight.original1]
    assert rows["fc"].is_leaf() and not rows["wn"].is_leaf()
    assert not rows["enc.self_attn.in_proj_weight[q]"].is_leaf()


def test_model_and_state_dict_give_equal_rows(every):
    with pytest.warns(UserWarning, match="grouped"):
        view = S.parameter_view(every)
    sd_view = S.parameter_view(every.state_dict())
    assert sd_view.rows == view.rows
    assert [r.module for r in sd_view.rows] == [None] * len(EVERY_ROWS)
    for a, b in zip(view.rows, sd_view.rows, strict=True):
        assert torch.equal(a.read().detach(), b.read()), a.name  # bit for bit
    assert dict(sd_view.left_out)["head.weight"] == "tied to emb.weight"


def test_old_style_hooks_and_spectral_norm_read_effective_values():
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = nn.utils.weight_norm(nn.Linear(6, 4))
    model = nn.Sequential(old, nn.utils.spectral_norm(nn.Linear(4, 3)),
                          nn.utils.parametrizations.spectral_norm(nn.Linear(3, 5))).eval()
    model(torch.randn(2, 6))
    view = S.parameter_view(model)
    assert view.names() == ["0", "1", "2"]
    with torch.no_grad():
        old.weight_v.mul_(2.0).add_(0.1)  # the hook refreshes `weight` only in forward
    g, v = old.weight_g, old.weight_v
    fresh = g * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(view.rows[0].read(), fresh, rtol=1e-6, atol=0)
    sd_rows = S.parameter_view(model.state_dict()).rows
    assert sd_rows == view.rows
    for a, b in zip(view.rows, sd_rows, strict=True):
        torch.testing.assert_close(a.read().detach(), b.read(), rtol=1e-6, atol=0)


def test_splits_are_options(every):
    with pytest.warns(UserWarning, match="grouped"):
        view = S.parameter_view(every, split_qkv=False, split_gates=True)
    rows = view.by_name()
    assert rows["enc.self_attn.in_proj_weight"].kind == "AttnQKV"
    assert [n for n in view.names() if n.startswith("lstm")] == [
        f"lstm.weight_{m}_l0[{g}]" for m in ("ih", "hh") for g in "ifgo"]
    assert [n for n in view.names() if n.startswith("gru.weight_hh")] == [
        f"gru.weight_hh_l0[{g}]" for g in "rzn"]
    assert rows["lstm.weight_hh_l0[g]"].index == slice(8, 12)
    assert rows["gru.weight_ih_l0[n]"].shape == (3, 8)
    sd = S.parameter_view(every.state_dict(), split_qkv=False, split_gates=True)
    assert sd.rows == view.rows


@pytest.mark.filterwarnings("ignore:.*grouped convolutions")
def test_one_selection_rule_for_every_caller(every):
    names = S.parameter_view(every, pattern="enc.self_attn.*").names()
    assert names == [r[0] for r in EVERY_ROWS[2:6]]
    # fullmatch on the module name ("mha": its own q/k/v), the full parameter name, the row
    assert S.parameter_view(every, pattern="mha").names() == [r[0] for r in EVERY_ROWS[8:11]]
    assert S.parameter_view(every, pattern=r"lstm\.weight_hh_l0").names() == [
        "lstm.weight_hh_l0"]
    assert S.parameter_view(every, pattern=r".*\[q\]").names() == [
        "enc.self_attn.in_proj_weight[q]"]
    # types: the owner, and the attention module for its out_proj
    assert S.parameter_view(every, types=nn.MultiheadAttention).names() == [
        r[0] for r in EVERY_ROWS[2:6] + EVERY_ROWS[8:12]]
    assert S.parameter_view(every, types=(nn.LSTM, nn.GRU)).names() == [
        r[0] for r in EVERY_ROWS[12:16]]
    assert S.parameter_view(every, names=["emb", "wn.weight"]).names() == ["emb", "wn"]
    hidden = S.parameter_view(every, hide=(nn.MultiheadAttention, nn.Embedding))
    assert "emb" not in hidden.names() and "mha.out_proj" not in hidden.names()
    assert dict(hidden.left_out)["emb"] == "type Embedding is hidden"
    # the same rule on a state_dict
    assert S.parameter_view(every.state_dict(), pattern="mha").names() == names_of(8, 11)
    with pytest.raises(ValueError, match=r"unknown layer names \['nope'\]"):
        S.parameter_view(every, names=["nope"])
    with pytest.raises(ValueError, match=r"without a >= 2-D weight: \['bn'\]"):
        S.parameter_view(every, names=["bn"])
    with pytest.raises(ValueError, match="'zzz' matches no layer"):
        S.parameter_view(every, pattern="zzz")
    with pytest.raises(TypeError, match="need an nn.Module"):
        S.parameter_view(every.state_dict(), types=nn.Linear)
    with pytest.raises(TypeError, match="nn.Module or a state_dict"):
        S.parameter_view([1, 2])


def names_of(i, j):
    return [r[0] for r in EVERY_ROWS[i:j]]


@pytest.mark.filterwarnings("ignore:.*grouped convolutions")
def test_split_row_gradient_reaches_its_slice(every):
    row = S.parameter_view(every, names=["enc.self_attn.in_proj_weight[v]"]).rows[0]
    row.read().square().sum().backward()
    grad = every.enc.self_attn.in_proj_weight.grad
    torch.testing.assert_close(grad[16:], 2 * every.enc.self_attn.in_proj_weight[16:].detach())
    assert not grad[:16].any()


def test_parametrizing_a_weight_keeps_its_row():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 6), nn.MultiheadAttention(6, 2), nn.Linear(6, 6))
    before = S.parameter_view(m).rows
    nn.utils.parametrize.register_parametrization(m[1], "in_proj_weight", nn.Identity())
    nn.utils.parametrizations.weight_norm(m[0])
    view = S.parameter_view(m)
    assert view.rows == before  # same names, kinds, order
    row = view.by_name()["1.in_proj_weight[k]"]
    assert row.param_name == "1.in_proj_weight" and row.leaves() == [
        m[1].parametrizations.in_proj_weight.original]
    assert S.parameter_view(m.state_dict()).rows == before


def test_conv_kinds_and_other_parameters():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ConvTranspose2d(3, 4, 2), nn.Conv3d(1, 2, 2),
                      nn.Bilinear(3, 4, 5))
    m.register_parameter("pos", nn.Parameter(torch.randn(1, 4, 8)))
    m.register_parameter("table", nn.Parameter(torch.randn(6, 5)))
    m.register_buffer("mask", torch.ones(4, 4))
    view = S.parameter_view(m)
    assert [(r.name, r.kind, r.shape) for r in view.rows] == [
        ("pos", "ParamNd", (1, 4, 8)), ("table", "Param2d", (6, 5)),
        ("0", "Conv1d", (3, 2, 3)), ("1", "Conv2d", (3, 4, 2, 2)),
        ("2", "Conv3d", (2, 1, 2, 2, 2)), ("3", "Conv1d", (5, 3, 4))]
    assert dict(view.left_out)["mask"] == "a buffer, not a parameter"
    # a state_dict cannot tell a buffer from a parameter (documented)
    assert "mask" in S.parameter_view(m.state_dict()).names()
