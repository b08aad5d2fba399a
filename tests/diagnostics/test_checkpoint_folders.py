"""``analyze`` on checkpoints as they are published (issue 21): sharded safetensors folders,
``.bin`` state dicts, LoRA adapters, fine-tune deltas, resume, bad files.

The checkpoint is GPT-2-shaped in Hugging Face naming: fused ``c_attn`` in the transposed
``Conv1D`` layout (weight ``(in, 3*out)``), tied ``wte`` / ``lm_head`` (stored twice, equal
values, as a safetensors file must), two shards and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bayes_spectral as bs
from bayes_spectral import cli

E, VOCAB, POS, BLOCKS, HEADS = 48, 100, 64, 3, 4
METRICS = ["alpha", "alpha_weighted", "stable_rank", "log_norm", "log_spectral_norm"]


def gpt2_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Heavy-tailed (Student-t) weights so alphas are finite and differ between layers."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / torch.rand(*shape, generator=g).add(0.05)
                ).mul(0.02).float()

    sd = {"transformer.wte.weight": w(VOCAB, E), "transformer.wpe.weight": w(POS, E)}
    for i in range(BLOCKS):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = torch.ones(E)
        sd[p + "attn.c_attn.weight"] = w(E, 3 * E)  # Conv1D: (in, 3*out)
        sd[p + "attn.c_attn.bias"] = torch.zeros(3 * E)
        sd[p + "attn.c_proj.weight"] = w(E, E)
        sd[p + "mlp.c_fc.weight"] = w(E, 4 * E)
        sd[p + "mlp.c_proj.weight"] = w(4 * E, E)
    sd["transformer.ln_f.weight"] = torch.ones(E)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # tied: equal values
    return sd


def write_sharded(folder, sd, index: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    half = keys.index("transformer.h.2.ln_1.weight")
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for fname, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(folder / fname))
    if index:
        weight_map = {k: f for f, ks in shards.items() for k in ks}
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"n_head": HEADS, "n_embd": E}))
    return folder


class Conv1D(nn.Module):
    """transformers' Conv1D: ``y = x @ weight + bias``, weight stored ``(in, out)``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.Module()
        self.ln_1.weight = nn.Parameter(torch.ones(E))
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(E, 3 * E)
        self.attn.c_proj = nn.Module()
        self.attn.c_proj.weight = nn.Parameter(torch.empty(E, E))
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Module()
        self.mlp.c_fc.weight = nn.Parameter(torch.empty(E, 4 * E))
        self.mlp.c_proj = nn.Module()
        self.mlp.c_proj.weight = nn.Parameter(torch.empty(4 * E, E))


class GPT2Like(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(VOCAB, E)
        self.transformer.wpe = nn.Embedding(POS, E)
        self.transformer.h = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.transformer.ln_f = nn.Module()
        self.transformer.ln_f.weight = nn.Parameter(torch.ones(E))
        self.lm_head = nn.Linear(E, VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: the same tensor


def expected_rows():
    """Rows in the order of a safetensors checkpoint: natural name order (h.2 < h.10)."""
    rows = []
    for i in range(BLOCKS):
        p = f"transformer.h.{i}."
        rows += [p + "attn.c_attn[q]", p + "attn.c_attn[k]", p + "attn.c_attn[v]",
                 p + "attn.c_proj", p + "mlp.c_fc", p + "mlp.c_proj"]
    return rows + ["transformer.wpe", "transformer.wte"]


def matrices(sd):
    """Row name -> the matrix as (out, in) for a Linear, by hand (Conv1D: transposed)."""
    out = {"transformer.wte": sd["transformer.wte.weight"],
           "transformer.wpe": sd["transformer.wpe.weight"]}
    for i in range(BLOCKS):
        p = f"transformer.h.{i}."
        qkv = sd[p + "attn.c_attn.weight"].T  # (3*out, in)
        for j, part in enumerate("qkv"):
            out[p + f"attn.c_attn[{part}]"] = qkv[j * E:(j + 1) * E]
        for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[p + name] = sd[p + name + ".weight"].T
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sharded(tmp_path_factory.mktemp("gpt2") / "ckpt", gpt2_state(0))


def quiet_analyze(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bs.analyze(*args, **kwargs)


def test_folder_rows_split_qkv_and_tied_once(folder):
    ds = quiet_analyze(folder)
    assert list(ds.layer.values) == expected_rows()
    kinds = dict(zip(ds.layer.values, ds.layer_type.values, strict=True))
    assert [kinds[f"transformer.h.0.attn.c_attn[{p}]"] for p in "qkv"] == [
        "AttnQ", "AttnK", "AttnV"]
    assert "lm_head.weight: tied to transformer.wte.weight" in ds.attrs["left_out"]
    # each split row is the hand-made block of the transposed Conv1D weight
    sd = gpt2_state(0)
    for name, mat in matrices(sd).items():
        ref = bs.spectral_metrics(mat.double(), method="gram")
        for m in METRICS:
            assert float(ds[m].sel(layer=name)) == pytest.approx(float(ref[m]), rel=1e-12)


def test_weightwatcher_on_linear_layers_holding_the_split_matrices(folder, monkeypatch):
    ww = pytest.importorskip("weightwatcher")
    from weightwatcher_numerics import pin_cpu_numerics

    pin_cpu_numerics(monkeypatch)  # WW with CUDA reads weights as float16: see that module
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    mats = matrices(gpt2_state(0))
    model = nn.Module()
    names = {}
    for i, (name, mat) in enumerate(mats.items()):
        lin = nn.Linear(mat.shape[1], mat.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(mat)
        model.add_module(f"m{i}", lin)
        names[f"m{i}"] = name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ww.WeightWatcher(model=model).analyze().set_index("name")
    ours = quiet_analyze(folder).to_dataframe()
    assert {names[n] for n in theirs.index} == set(ours.index)
    for n in theirs.index:
        for m in METRICS:
            assert ours.loc[names[n], m] == pytest.approx(theirs.loc[n, m], rel=1e-6), (n, m)


def test_folder_file_bin_and_module_give_the_same_rows(folder, tmp_path):
    sd = gpt2_state(0)
    model = GPT2Like()
    model.load_state_dict(sd)
    from_module = quiet_analyze(model)
    from_folder = quiet_analyze(folder)
    no_index = write_sharded(tmp_path / "noindex", sd, index=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "one.safetensors"))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # shared storage: tied
    # a module keeps its state_dict order, safetensors files their sorted names
    assert list(from_module.layer.values[:2]) == ["transformer.wte", "transformer.wpe"]
    assert list(from_folder.layer.values) == expected_rows()
    assert list(quiet_analyze(tmp_path / "pytorch_model.bin").layer.values) == list(
        from_module.layer.values)
    for other in (from_folder, quiet_analyze(no_index),
                  quiet_analyze(tmp_path / "one.safetensors"),
                  quiet_analyze(tmp_path / "pytorch_model.bin"), quiet_analyze(str(folder))):
        same = other.sel(layer=from_module.layer.values)
        assert sorted(other.layer.values) == sorted(from_module.layer.values)
        assert list(same.layer_type.values) == list(from_module.layer_type.values)
        for m in METRICS + ["xmin", "num_tail"]:
            np.testing.assert_array_equal(same[m].values, from_module[m].values)


def write_lora(folder, r=12, alpha=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(BLOCKS):
        p = f"base_model.model.transformer.h.{i}.attn."
        tensors[p + "c_attn.lora_A.weight"] = torch.randn(r, E, generator=g)
        tensors[p + "c_attn.lora_B.weight"] = torch.randn(3 * E, r, generator=g)
        tensors[p + "c_proj.lora_A.weight"] = torch.randn(r, E, generator=g)
        tensors[p + "c_proj.lora_B.weight"] = torch.randn(E, r, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "fan_in_fan_out": True,
         "target_modules": ["c_attn", "c_proj"]}))
    return tensors


def test_lora_adapter_deltas_equal_b_a_times_scaling(tmp_path):
    r, alpha = 12, 24
    t = write_lora(tmp_path / "adapter", r, alpha)
    ds = quiet_analyze(tmp_path / "adapter")
    expected = []
    for i in range(BLOCKS):
        p = f"transformer.h.{i}.attn."
        src = f"base_model.model.{p}"
        d_attn = (t[src + "c_attn.lora_B.weight"] @ t[src + "c_attn.lora_A.weight"]) * (alpha / r)
        d_proj = (t[src + "c_proj.lora_B.weight"] @ t[src + "c_proj.lora_A.weight"]) * (alpha / r)
        for j, part in enumerate("qkv"):
            expected.append((p + f"c_attn[{part}]", d_attn[j * E:(j + 1) * E]))
        expected.append((p + "c_proj", d_proj))
    assert list(ds.layer.values) == [n for n, _ in expected]
    for name, mat in expected:
        ref = bs.spectral_metrics(mat.double(), method="gram")
        for m in ["stable_rank", "log_norm", "log_spectral_norm"]:
            assert float(ds[m].sel(layer=name)) == pytest.approx(float(ref[m]), rel=1e-9)
        assert int(ds["numerical_rank"].sel(layer=name)) == r


def test_lora_adapter_with_a_base_is_refused(tmp_path, folder, capsys):
    write_lora(tmp_path / "adapter")
    got, err = run(["analyze", tmp_path / "adapter", "--base", folder], capsys)
    assert got == cli.EXIT_USAGE and "LoRA adapter" in err[0]


def test_fine_tune_deltas_against_a_base(tmp_path, folder):
    base = gpt2_state(0)
    g = torch.Generator().manual_seed(7)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
             for k, v in base.items()}
    tuned["lm_head.weight"] = tuned["transformer.wte.weight"].clone()
    write_sharded(tmp_path / "tuned", tuned)
    ds = quiet_analyze(tmp_path / "tuned", base=folder)
    assert list(ds.layer.values) == expected_rows()
    deltas = matrices({k: tuned[k] - base[k] for k in base})
    for name, mat in deltas.items():
        ref = bs.spectral_metrics(mat.double(), method="gram")
        for m in METRICS:
            assert float(ds[m].sel(layer=name)) == pytest.approx(float(ref[m]), rel=1e-9)
    # a module as the base gives the same
    model = GPT2Like()
    model.load_state_dict(base)
    same = quiet_analyze(tmp_path / "tuned", base=model)
    np.testing.assert_array_equal(same["alpha"].values, ds["alpha"].values)


def test_base_with_other_shape_is_refused_by_name(tmp_path, folder):
    other = gpt2_state(0)
    other["transformer.wpe.weight"] = torch.randn(POS + 1, E)
    write_sharded(tmp_path / "other", other)
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight.*shape"):
        quiet_analyze(tmp_path / "other", base=folder)


class Stop(Exception):
    pass


def test_interrupted_scan_resumes_and_refuses_other_settings(tmp_path, folder):
    resume = tmp_path / "out" / "resume"
    seen = []

    def stop_after_4(name, row):
        seen.append(name)
        if len(seen) == 4:
            raise Stop

    with pytest.raises(Stop):
        quiet_analyze(folder, resume=resume, on_row=stop_after_4)
    saved = [json.loads(p.read_text())["name"] for p in sorted((resume / "rows").glob("*"))]
    assert saved == expected_rows()[:4]
    again = []
    ds = quiet_analyze(folder, resume=resume, on_row=lambda n, r: again.append(n))
    assert again == expected_rows()[4:]  # the first four were read back, not recomputed
    full = quiet_analyze(folder)
    for m in METRICS + ["xmin", "num_tail"]:
        np.testing.assert_array_equal(ds[m].values, full[m].values)
    with pytest.raises(ValueError, match=r"resume.*min_evals"):
        quiet_analyze(folder, resume=resume, min_evals=9)


def test_max_aspect_leaves_out_elongated_matrices(folder):
    ds = quiet_analyze(folder, max_aspect=2.0)  # wte 100x48 > 2; c_fc 48x192 = 4 > 2
    assert "transformer.wte" not in ds.layer.values
    assert "transformer.h.0.mlp.c_fc" not in ds.layer.values
    assert "transformer.wpe" in ds.layer.values
    assert re.search(r"transformer\.wte: aspect ratio 2\.08 > max_aspect=2", ds.attrs["left_out"])


def test_query_key_value_is_split_per_head_with_known_heads(tmp_path):
    # GPT-NeoX: rows grouped per head as [q_h, k_h, v_h] blocks of head_dim rows
    torch.manual_seed(0)
    w = torch.randn(3 * E, E)
    folder = tmp_path / "neox"
    folder.mkdir()
    save_file({"gpt_neox.layers.0.attention.query_key_value.weight": w},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": HEADS}))
    ds = quiet_analyze(folder)
    hd = E // HEADS
    blocks = w.view(HEADS, 3, hd, E)
    for j, part in enumerate("qkv"):
        name = f"gpt_neox.layers.0.attention.query_key_value[{part}]"
        ref = bs.spectral_metrics(blocks[:, j].reshape(E, E).double(), method="gram")
        assert float(ds["log_norm"].sel(layer=name)) == pytest.approx(float(ref["log_norm"]),
                                                                       rel=1e-12)
        assert float(ds["alpha"].sel(layer=name)) == pytest.approx(float(ref["alpha"]),
                                                                    rel=1e-12)
    (folder / "config.json").unlink()  # heads unknown: one fused row, not a wrong split
    ds = quiet_analyze(folder)
    assert list(ds.layer_type.values) == ["AttnQKV"]


# --- bad files through the command line ----------------------------------------------------


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip()]


def _truncate(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-300])
    return r"model-00002-of-00002\.safetensors.*tensor '[a-z_.0-9]+'.*truncated"


def _missing(folder):
    (folder / "model-00002-of-00002.safetensors").unlink()
    return r"model-00002-of-00002\.safetensors: no such file.*tensor 'transformer\.h\.2\."


def _bad_header(folder):
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{garbage}")
    return r"model-00001-of-00002\.safetensors.*header"


BAD = [("truncated shard", _truncate, cli.EXIT_BAD_FILE),
       ("index names a missing shard", _missing, cli.EXIT_BAD_FILE),
       ("unreadable header", _bad_header, cli.EXIT_BAD_FILE)]


@pytest.mark.parametrize("kind, spoil, code", BAD, ids=[b[0] for b in BAD])
def test_bad_folders_exit_codes_name_file_and_tensor(kind, spoil, code, tmp_path, capsys):
    folder = write_sharded(tmp_path / "ckpt", gpt2_state(0))
    pattern = spoil(folder)
    got, err = run(["analyze", folder], capsys)
    assert got == code
    assert len(err) == 1 and re.search(pattern, err[0]), err


def test_nan_tensor_exit_5_names_file_and_tensor(tmp_path, capsys):
    sd = gpt2_state(0)
    sd["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    folder = write_sharded(tmp_path / "ckpt", sd)
    named = r"model-00001-of-00002\.safetensors.*'transformer\.h\.1\.mlp\.c_fc\.weight'.*NaN"
    got, err = run(["analyze", folder, "--strict"], capsys)
    assert got == cli.EXIT_NON_FINITE
    assert len(err) == 1 and re.search(named, err[0]), err
    # by default (as for .pt files before): left out with a warning naming file and tensor
    with pytest.warns(UserWarning, match=named):
        assert cli.main(["analyze", str(folder)]) == 0
    assert "transformer.h.1.mlp.c_fc " not in capsys.readouterr().out
    with pytest.warns(UserWarning, match=named):
        ds = bs.analyze(folder)
    assert "transformer.h.1.mlp.c_fc" not in ds.layer.values


def test_bin_file_is_never_unpickled(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    got, err = run(["analyze", tmp_path], capsys)
    assert got == cli.EXIT_BAD_FILE and "pytorch_model.bin" in err[0]
    assert not (tmp_path / "PWNED").exists()


def test_cli_report_files(tmp_path, capsys, folder):
    out = tmp_path / "report"
    got, err = run(["analyze", folder, "--out", out, "--esd-layers", r".*c_attn\[q\]"], capsys)
    assert got == 0, err
    import pandas as pd
    import xarray as xr

    table = pd.read_csv(out / "analysis.csv", index_col=0)
    assert list(table.index) == expected_rows()
    with xr.open_dataset(out / "analysis.nc") as ds:
        np.testing.assert_allclose(ds["alpha"].values, table["alpha"].values, rtol=1e-12)
    assert (out / "alpha_by_depth.png").stat().st_size > 5_000
    esd_pngs = sorted(p.name for p in out.glob("esd_*.png"))
    assert len(esd_pngs) == BLOCKS
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == 1 + BLOCKS
    assert "transformer.h.2.attn.c_attn[v]" in html
    assert (out / "analyze_resume" / "settings.json").is_file()  # the resume folder


def test_per_head_rows_are_the_heads_output_features(folder):
    ds = quiet_analyze(folder, per_head=True, layers=r"transformer\.h\.0\.attn\.c_attn.*")
    hd = E // HEADS
    names = [f"transformer.h.0.attn.c_attn[{p}][h{h}]" for p in "qkv" for h in range(HEADS)]
    assert list(ds.layer.values) == names
    w = gpt2_state(0)["transformer.h.0.attn.c_attn.weight"]  # (in, 3*out)
    for j, p in enumerate("qkv"):
        for h in range(HEADS):
            mat = w[:, j * E + h * hd: j * E + (h + 1) * hd]
            ref = bs.spectral_metrics(mat.double(), method="gram")
            got = ds.sel(layer=f"transformer.h.0.attn.c_attn[{p}][h{h}]")
            assert float(got["log_norm"]) == pytest.approx(float(ref["log_norm"]), rel=1e-12)
    # the module gives the same per-head rows (heads from model.config)
    model = GPT2Like()
    model.load_state_dict(gpt2_state(0))
    model.config = {"n_head": HEADS}
    same = quiet_analyze(model, per_head=True, layers=r"transformer\.h\.0\.attn\.c_attn.*")
    np.testing.assert_array_equal(same["alpha"].values, ds["alpha"].values)


def test_thread_policy_leaves_busy_cores_to_others(monkeypatch):
    from bayes_spectral.diagnostics import scan

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(scan, "_running_others", lambda: float(cores))
    assert scan.default_threads() == 1
    monkeypatch.setattr(scan, "_running_others", lambda: 0.0)
    assert scan.default_threads() == min(torch.get_num_threads(), cores)
    before = torch.get_num_threads()
    with scan.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
