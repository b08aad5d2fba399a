"""per_head=True on separately stored q/k/v projections with grouped-query attention
(Llama / Mistral naming): query rows split by num_attention_heads, key/value rows by
num_key_value_heads."""

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bayes_spectral as bs

HIDDEN, HEADS, KV_HEADS = 32, 4, 2
HEAD_DIM = HIDDEN // HEADS  # 8
ATTN = "model.layers.{}.self_attn.{}_proj"


def gqa_state(layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for p, out in [("q", HIDDEN), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM),
                       ("o", HIDDEN)]:
            sd[ATTN.format(i, p) + ".weight"] = torch.randn(out, HIDDEN, generator=g)
        sd[f"model.layers.{i}.mlp.gate_proj.weight"] = torch.randn(64, HIDDEN, generator=g)
        sd[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(HIDDEN, 64, generator=g)
    return sd


def quiet(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bs.analyze(model, threads=1, **kw)


def hand_esd(w: torch.Tensor) -> np.ndarray:
    w = w.double()
    return torch.linalg.eigvalsh(w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w).numpy()


def expected_names(layers: int = 2) -> list[str]:
    names = []
    for i in range(layers):
        names += [f"{ATTN.format(i, 'q')}[h{h}]" for h in range(HEADS)]
        names += [f"{ATTN.format(i, p)}[h{h}]" for p in "kv" for h in range(KV_HEADS)]
        names += [ATTN.format(i, "o"), f"model.layers.{i}.mlp.gate_proj",
                  f"model.layers.{i}.mlp.down_proj"]
    return names


def check_heads(ds, sd):
    assert sorted(ds.layer.values) == sorted(expected_names())
    for i in range(2):
        for p, n in [("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)]:
            w = sd[ATTN.format(i, p) + ".weight"]
            for h in range(n):
                name = f"{ATTN.format(i, p)}[h{h}]"
                got = ds.esd.sel(layer=name).values
                got = got[~np.isnan(got)]
                want = hand_esd(w[h * HEAD_DIM:(h + 1) * HEAD_DIM])
                assert got.shape == (HEAD_DIM,), name
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
                assert ds.shape.sel(layer=name).item() == f"{HEAD_DIM}x{HIDDEN}"


def test_per_head_gqa_rows_from_arguments():
    sd = gqa_state()
    ds = quiet(sd, per_head=True, heads=HEADS, kv_heads=KV_HEADS, return_esd=True)
    check_heads(ds, sd)


def test_per_head_gqa_from_config_json(tmp_path):
    sd = gqa_state()
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "hidden_size": HIDDEN, "model_type": "llama"}))
    ds = quiet(tmp_path, per_head=True, return_esd=True)
    check_heads(ds, sd)


def test_per_head_kv_heads_inferred_from_the_query_head_dim():
    """Without kv_heads: the key/value head dim is the query's (out / heads)."""
    sd = gqa_state()
    ds = quiet(sd, per_head=True, heads=HEADS, return_esd=True)
    check_heads(ds, sd)


def test_per_head_mha_separate_projections_equal_heads():
    g = torch.Generator().manual_seed(3)
    sd = {f"enc.attn.{p}_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=g) for p in "qkvo"}
    ds = quiet(sd, per_head=True, heads=HEADS, return_esd=True)
    assert len(ds.layer) == 3 * HEADS + 1
    w = sd["enc.attn.v_proj.weight"]
    got = ds.esd.sel(layer="enc.attn.v_proj[h3]").values
    np.testing.assert_allclose(got[~np.isnan(got)], hand_esd(w[3 * HEAD_DIM:]), rtol=1e-10,
                               atol=1e-12)


def test_without_per_head_the_projections_stay_whole():
    sd = gqa_state()
    ds = quiet(sd, heads=HEADS, kv_heads=KV_HEADS)
    assert ATTN.format(0, "k") in ds.layer.values and len(ds.layer) == 12


@pytest.mark.parametrize("kw, tensor, words", [
    (dict(heads=HEADS, kv_heads=3), ATTN.format(0, "k"), "kv_heads=3"),
    (dict(heads=5, kv_heads=KV_HEADS), ATTN.format(0, "q"), "heads=5"),
    (dict(heads=HEADS, kv_heads=4), ATTN.format(0, "k"), "head dim"),
])
def test_per_head_mismatch_names_the_tensor(kw, tensor, words):
    with pytest.raises(ValueError, match=words) as err:
        quiet(gqa_state(), per_head=True, **kw)
    assert tensor in str(err.value)


def test_config_head_dim_mismatch_names_config(tmp_path):
    sd = gqa_state()
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": 16}))
    with pytest.raises(ValueError, match="head_dim=16") as err:
        quiet(tmp_path, per_head=True)
    assert ATTN.format(0, "q") in str(err.value)


def test_per_head_gqa_module_with_config():
    """An nn.Module whose ``config`` states the heads equals its state dict with them."""
    from types import SimpleNamespace

    from torch import nn

    sd = gqa_state(layers=1)
    model = nn.Module()
    for name, w in sd.items():
        *path, _ = name.split(".")
        parent = model
        for part in path[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        parent.add_module(path[-1], lin)
    model.config = SimpleNamespace(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   hidden_size=HIDDEN)
    a = quiet(model, per_head=True, return_esd=True)
    b = quiet(sd, per_head=True, heads=HEADS, kv_heads=KV_HEADS, return_esd=True)
    assert list(a.layer.values) == list(b.layer.values)
    assert f"{ATTN.format(0, 'k')}[h1]" in a.layer.values
    np.testing.assert_array_equal(a.esd.values, b.esd.values)


def test_cli_per_head_and_kv_heads(tmp_path, capsys):
    """``bayes-spectral analyze DIR --per-head [--kv-heads K]``: the same rows as the API;
    a head count that does not divide the tensor is a usage error naming it (exit 2)."""
    from bayes_spectral import cli

    sd = gqa_state()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    out = tmp_path / "out"
    code = cli.main(["analyze", str(folder), "--per-head", "--heads", str(HEADS),
                     "--kv-heads", str(KV_HEADS), "--threads", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    import pandas as pd

    table = pd.read_csv(out / "analysis.csv")
    assert sorted(table.layer) == sorted(expected_names())
    api = quiet(folder, per_head=True, heads=HEADS, kv_heads=KV_HEADS)
    got = table.set_index("layer").loc[list(api.layer.values), "alpha"].to_numpy()
    np.testing.assert_allclose(got, api.alpha.values, rtol=1e-12)
    capsys.readouterr()
    code = cli.main(["analyze", str(folder), "--per-head", "--heads", str(HEADS),
                     "--kv-heads", "3", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and ATTN.format(0, "k") in err and len(err.splitlines()) == 1
    assert cli.main(["analyze", str(folder), "--per-head", "--kv-heads", "0"]) == cli.EXIT_USAGE
    assert "--kv-heads 0" in capsys.readouterr().err
