"""select.py: which rows each caller's policy yields today, regex modes, precedence.

One model with the module kinds that tell the policies apart: Linear, Conv2d, BatchNorm
(1-D weight), Embedding (2-D weight, not Linear), MultiheadAttention (fused
``in_proj_weight`` plus an ``out_proj`` that subclasses Linear) and LSTM (no ``weight``).
"""

import re
import warnings

import pytest
import torch
from torch import nn

from bayes_spectral import select as S
from bayes_spectral.diagnostics.analyze import weight_layers
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


LINEAR_CONV_ROWS = ["conv", "attn.out_proj", "fc", "head"]
VIEW_ROWS = ["emb", "conv", "attn.in_proj_weight[q]", "attn.in_proj_weight[k]",
             "attn.in_proj_weight[v]", "attn.out_proj", "lstm.weight_ih_l0",
             "lstm.weight_hh_l0", "fc", "head"]


@pytest.fixture
def zoo():
    torch.manual_seed(0)
    return Zoo()


# --- each policy, as its caller uses it today --------------------------------------------


def test_analyze_policy_counts_linear_conv_with_matrix_weights(zoo):
    rows = weight_layers(zoo)
    assert [(n, k) for n, k, _ in rows] == [
        ("conv", "Conv2d"), ("attn.out_proj", "NonDynamicallyQuantizableLinear"),
        ("fc", "Linear"), ("head", "Linear")]
    assert rows[2][2] is zoo.fc.weight
    # opted-in 2-D parameters come last, as "Parameter"
    rows = weight_layers(zoo, include=["attn.in_proj_weight"])
    assert rows[-1][:2] == ("attn.in_proj_weight", "Parameter")


def test_analyze_policy_reports_what_it_left_out(zoo):
    view = S.linear_conv_view(zoo, include=["attn.in_proj_weight"], layers=["fc", "head"])
    assert view.names() == ["fc", "head"]
    reasons = dict(view.left_out)
    assert reasons["emb"] == "type Embedding is not counted"
    assert reasons["bn"] == "type BatchNorm2d is not counted"
    assert reasons["lstm.weight_ih_l0"].startswith("a 2-D parameter of LSTM")
    assert reasons["conv"] == "not selected by `layers`"
    assert reasons["attn.in_proj_weight"] == "not selected by `layers`"
    assert "act" not in reasons  # no weight, nothing to report


def test_state_dict_policy_differs_from_the_module_policy(zoo):
    view = S.state_dict_weights(zoo.state_dict())
    assert [(r.name, r.kind) for r in view.rows] == [
        ("emb", "Matrix"), ("conv", "Conv2d"), ("attn.in_proj_weight", "Matrix"),
        ("attn.out_proj", "Matrix"), ("fc", "Matrix"), ("head", "Matrix")]
    reasons = dict(view.left_out)
    assert reasons["bn.weight"] == "has 1 dims (needs 2 to 5)"
    assert reasons["lstm.weight_ih_l0"] == "not a `*weight` entry"
    assert "fc.bias" not in reasons


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
    # the root is listed last (modules_by_name)
    seq = nn.Sequential(nn.Linear(2, 2))
    assert list(S.modules_by_name(seq)) == ["0", "<root>"]
    view = S.pick_modules(zoo, types=nn.Linear)
    assert view.names() == ["attn.out_proj", "fc", "head"]
    assert dict(view.left_out)["conv"] == "not selected"


def test_bnn_policy_counts_any_module_with_a_weight_parameter(zoo):
    layers = S.weight_modules(zoo, types=None, source="parameter", min_dim=0, root="").modules()
    assert list(layers) == ["emb", "conv", "bn", "attn.out_proj", "fc", "head"]
    assert layers["bn"] is zoo.bn
    # a module that is itself a layer keeps the name "" here
    assert list(S.weight_modules(nn.Linear(2, 2), types=None, source="parameter",
                                 min_dim=0, root="").modules()) == [""]


def test_compare_policy_counts_linear_only(zoo):
    view = S.weight_modules(zoo, types=(nn.Linear,), min_dim=None, root="")
    assert view.names() == ["attn.out_proj", "fc", "head"]


def test_hidden_types_are_reported(zoo):
    view = S.weight_modules(zoo, hide=(nn.Conv2d,))
    assert view.names() == ["attn.out_proj", "fc", "head"]
    assert dict(view.left_out)["conv"] == "type Conv2d is hidden"
    view = S.weight_modules(zoo, types=None, source="parameter", min_dim=2)
    assert view.names() == ["emb", "conv", "attn.out_proj", "fc", "head"]
    assert dict(view.left_out)["bn"] == "weight has 1 dims (needs >= 2)"
    with pytest.raises(ValueError, match="types=None needs a min_dim"):
        S.weight_modules(zoo, types=None, min_dim=None)


def test_parametrized_weight_is_read_as_its_effective_value(zoo):
    nn.utils.parametrizations.orthogonal(zoo.fc)
    view = S.weight_modules(zoo)
    fc = view.rows[view.names().index("fc")]
    torch.testing.assert_close(fc.weight, zoo.fc.weight)
    assert not any(n.startswith("fc.parametrizations") for n, _ in view.left_out)
    # a registered `weight` parameter only: the parametrized layer is not one
    names = S.weight_modules(zoo, types=None, source="parameter", min_dim=0).names()
    assert "fc" not in names


# --- regex modes ----------------------------------------------------------------------------


def test_fullmatch_vs_search():
    names = ["fc", "attn.out_proj", "head"]
    assert [n for n in names if S.regex_matcher("out", "search")(n)] == ["attn.out_proj"]
    assert [n for n in names if S.regex_matcher("out", "fullmatch")(n)] == []
    assert [n for n in names if S.regex_matcher(r".*out.*", "fullmatch")(n)] == ["attn.out_proj"]
    with pytest.raises(ValueError, match="'fullmatch' or 'search'"):
        S.regex_matcher("x", "match")


def test_callers_regex_modes(zoo):
    # weight_layers (old analyze policy): re.search; Regularizer (issue 17) and bayesian:
    # re.fullmatch
    assert [n for n, _, _ in weight_layers(zoo, layers="out")] == ["attn.out_proj"]
    with pytest.raises(ValueError, match="'out' matches no layer"):
        Regularizer(zoo, WeightDecay(), pattern="out")
    assert list(Regularizer(zoo, WeightDecay(), pattern=".*out.*").layers) == ["attn.out_proj"]
    layers = S.weight_modules(zoo, types=None, source="parameter", min_dim=0, root="").modules()
    with pytest.raises(ValueError, match="'out' is not a layer name and matches no layer"):
        S.pick_layers("out", layers, "priors")
    assert S.pick_layers("out", layers, "priors", mode="search") == ["attn.out_proj"]
    assert S.pick_layers(r"attn\..*", layers, "priors") == ["attn.out_proj"]


def test_bad_regex(zoo):
    layers = S.weight_modules(zoo, types=None, source="parameter", min_dim=0, root="").modules()
    # bayesian's policy names the pattern in a ValueError
    with pytest.raises(ValueError, match=r"priors: 'fc\[' is neither a layer name nor a valid"):
        S.pick_layers("fc[", layers, "priors")
    # weight_layers lets re.error through; the parameter view (Regularizer, analyze; issue
    # 17) names the pattern in a ValueError
    with pytest.raises(re.error):
        weight_layers(zoo, layers="fc[")
    with pytest.raises(ValueError, match=r"'fc\[' is not a valid regular expression"):
        Regularizer(zoo, WeightDecay(), pattern="fc[")


# --- bayesian's keys: exact name > regex > type ---------------------------------------------


def test_precedence_exact_over_regex_over_type(zoo):
    layers = S.weight_modules(zoo, types=None, source="parameter", min_dim=0, root="").modules()
    keyed = {nn.Linear: "by type", r"h.*": "by regex", "fc": "by name"}
    assert S.resolve_keys(keyed, layers, "priors") == {
        "attn.out_proj": "by type", "fc": "by name", "head": "by regex"}
    # the order of the keys does not matter
    reordered = dict(reversed(list(keyed.items())))
    assert S.resolve_keys(reordered, layers, "priors") == S.resolve_keys(keyed, layers, "priors")
    # None keeps a layer out, whatever matched it at lower precedence
    assert "fc" not in S.resolve_keys({nn.Linear: 1, "fc": None}, layers, "priors")
    with pytest.raises(ValueError, match="'fc' is matched by two keys of the same kind"):
        S.resolve_keys({r"f.*": 1, r"fc|head": 2}, layers, "priors")


def test_pick_union_and_errors(zoo):
    layers = S.weight_modules(zoo, types=None, source="parameter", min_dim=0, root="").modules()
    assert S.pick_union(None, layers, "spectral") == []
    assert S.pick_union(True, layers, "spectral") == list(layers)
    assert S.pick_union(["head", nn.Linear], layers, "spectral") == [
        "head", "attn.out_proj", "fc"]
    with pytest.raises(ValueError, match="spectral: no layer of type Conv1d"):
        S.pick_union(nn.Conv1d, layers, "spectral")
    with pytest.raises(TypeError, match="is not a torch.nn.Module type"):
        S.pick_layers(int, layers, "spectral")
    with pytest.raises(TypeError, match="chosen by type, name or regex"):
        S.pick_layers(3, layers, "spectral")


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
