"""select.py: which rows each caller's policy yields today, regex modes, precedence.

One model with the module kinds that tell the policies apart: Linear, Conv2d, BatchNorm
(1-D weight), Embedding (2-D weight, not Linear), MultiheadAttention (fused
``in_proj_weight`` plus an ``out_proj`` that subclasses Linear) and LSTM (no ``weight``).
"""

import re

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


def test_penalty_policy_takes_linear_conv_weights_unchecked(zoo):
    assert [n for n, _ in weight_layers_of(zoo)] == LINEAR_CONV_ROWS
    assert weight_layers_of(nn.Linear(3, 3))[0][0] == "<root>"


def test_regularizer_policy(zoo):
    assert list(Regularizer(zoo, WeightDecay()).layers) == LINEAR_CONV_ROWS
    assert list(Regularizer(zoo, WeightDecay(), pattern="e").layers) == ["emb", "head"]
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
    # analyze and Regularizer: re.search; bayesian: re.fullmatch
    assert [n for n, _, _ in weight_layers(zoo, layers="out")] == ["attn.out_proj"]
    assert list(Regularizer(zoo, WeightDecay(), pattern="out").layers) == ["attn.out_proj"]
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
    # analyze and Regularizer let re.error through, as they do today
    with pytest.raises(re.error):
        weight_layers(zoo, layers="fc[")
    with pytest.raises(re.error):
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
