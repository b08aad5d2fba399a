"""Issue 22: verdicts with their uncertainty, and the claims table generated from summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bayes_spectral.models import _verdicts as V
from scipy import stats

from bayes_spectral import cli
from bayes_spectral.apps import claims as C


def test_paired_difference_matches_scipy_and_hand_interval():
    rng = np.random.default_rng(0)
    b = rng.normal(0.9, 0.02, size=6)
    a = b + rng.normal(0.01, 0.01, size=6)
    st = V.paired_difference(a, b, num_boot=4000, seed=1)
    res = stats.ttest_rel(a, b)
    assert st["t"] == pytest.approx(res.statistic) and st["p_value"] == pytest.approx(res.pvalue)
    d = a - b
    half = stats.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert st["ci_low"] == pytest.approx(d.mean() - half, rel=1e-12)
    assert st["ci_high"] == pytest.approx(d.mean() + half, rel=1e-12)
    assert st["num_seeds"] == 6 and st["mean_diff"] == pytest.approx(d.mean())
    # the percentile bootstrap interval lies inside [min d, max d] and around the mean
    assert d.min() <= st["boot_low"] < d.mean() < st["boot_high"] <= d.max()
    one = V.paired_difference([0.5], [0.4])
    assert one["num_seeds"] == 1 and math.isnan(one["ci_low"]) and math.isnan(one["p_value"])
    with pytest.raises(ValueError, match="equal-length"):
        V.paired_difference([1.0, 2.0], [1.0])


def test_verdicts_and_what_would_change():
    base = np.array([0.90, 0.91, 0.92, 0.93])
    up = V.claim_row("x", "acc", "wd", base + [0.050, 0.052, 0.049, 0.051], base, sign=1)
    assert up["verdict"] == "reproduced"
    assert V.claim_row("x", "acc", "wd", base + 0.05 + [0, 1e-3, -1e-3, 0], base,
                       sign=-1)["verdict"] == "contradicted"
    noisy = V.claim_row("x", "acc", "wd", base + [0.01, -0.012, 0.015, -0.009], base,
                        note="regime note")
    assert noisy["verdict"] == "not resolved" and noisy["would_change"].endswith("regime note")
    # seeds at which today's mean and sd would exclude 0: ceil((t sd / mean)^2)
    d = np.array([0.01, -0.012, 0.015, -0.009])
    need = math.ceil((stats.t.ppf(0.975, 3) * d.std(ddof=1) / abs(d.mean())) ** 2)
    assert f"at about {need} seeds" in noisy["would_change"]
    assert V.claim_row("x", "acc", "wd", [0.9], [0.8])["verdict"] == "one seed"
    with pytest.raises(ValueError, match="sign"):
        V.claim_row("x", "acc", "wd", [0.9], [0.8], sign=0)


def _tiny_runs(out):
    from bayes_spectral.models import (
        deep_matrix_factorization,
        diagonal_weight_norm,
        heavy_tailed,
        low_rank_weight_decay,
        spectral_norm,
    )

    low_rank_weight_decay.run(low_rank_weight_decay.Config(
        weight_decays=(0.0, 0.1), width=8, steps=60, seeds=(0, 1)), out_dir=out)
    diagonal_weight_norm.run(diagonal_weight_norm.Config(
        num_samples=10, dim=20, sparsity=2, alphas=(0.3,), kappas=(0.01,), seeds=(0, 1),
        max_iter=300), out_dir=out)
    deep_matrix_factorization.run(deep_matrix_factorization.Config(
        dim=4, num_measurements=(12,), depths=(2,), steps=60, seeds=(0, 1)), out_dir=out)
    spectral_norm.run(spectral_norm.Config(
        dataset="digits", batch_sizes=(256,), seeds=(0, 1), width=8, steps=20,
        methods=("weight_decay", "spectral_norm")), out_dir=out)
    heavy_tailed.run(heavy_tailed.Config(
        archs=("fc3",), fc3_hidden=(16, 8), methods=("weight_decay", "weighted_alpha"),
        estimators=("hill", "ks"), seeds=(0, 1), epochs=1, num_train=100), out_dir=out)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    _tiny_runs(out)
    return out


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


@pytest.mark.slow
def test_claims_table_is_rendered_from_the_summaries(out):
    summaries = C.load_summaries(out)
    assert sorted(s["model"] for s in summaries) == sorted(
        ["low_rank_weight_decay", "diagonal_weight_norm", "deep_matrix_factorization",
         "spectral_norm", "heavy_tailed"])
    table = C.render_claims(summaries, detail=True)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln]
    heads = [ln for ln in lines if len(_cells(ln)) == 7][1:]  # skip the header line
    assert len(heads) == 5
    for s, line in zip(summaries, heads, strict=True):
        cells = _cells(line)
        r = s["rows"][0]
        assert cells[3] == "/".join(str(n) for n in sorted({x["num_seeds"] for x in s["rows"]}))
        assert f"{r['mean_diff']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]" in cells[4]
        p = "-" if r["p_value"] is None else f"{r['p_value']:.3g}"
        assert cells[4].endswith(f"p = {p}")
        assert cells[5] == C.paper_verdict(s["rows"])
    chen = next(ln for ln in heads if ln.startswith("| Chen et al. 2024"))
    assert "withdrawn conference submission" in _cells(chen)[0]
    assert not any("withdrawn" in _cells(ln)[0] for ln in heads if ln is not chen)
    # detail table: one line per row, numbers equal to the summaries'
    detail = [ln for ln in lines if len(_cells(ln)) == 9][1:]
    rows = [r for s in summaries for r in s["rows"]]
    assert len(detail) == len(rows)
    for r, line in zip(rows, detail, strict=True):
        cells = _cells(line)
        assert float(cells[5]) == pytest.approx(r["mean_diff"], rel=5e-3, abs=1e-12)
        assert cells[4] == str(r["num_seeds"]) == "2" and cells[8] == r["verdict"]
    ht = next(s for s in summaries if s["model"] == "heavy_tailed")
    assert "[hill]" in ht["rows"][0]["comparison"]  # the paper's estimator first


@pytest.mark.slow
def test_claims_cli_prints_and_writes(out, capsys, tmp_path):
    target = tmp_path / "claims.md"
    assert cli.main(["claims", "--from", str(out), "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    want = C.render_claims(C.load_summaries(out))
    assert printed.startswith(want) and target.read_text() == want
    summary = json.loads((out / "spectral_norm_summary.json").read_text())
    assert "4096" in summary["rows"][0]["would_change"]


def test_claims_errors(tmp_path, capsys):
    assert cli.main(["claims", "--from", str(tmp_path)]) == cli.EXIT_USAGE
    assert "no *_summary.json" in capsys.readouterr().err
    (tmp_path / "x_summary.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match="not a claim summary"):
        C.load_summaries(tmp_path)
    assert cli.main(["reproduce", "heavy_tailed", "--config", "nope"]) == cli.EXIT_USAGE
    assert "paper_small" in capsys.readouterr().err


@pytest.mark.slow
def test_summary_rebuilt_from_saved_csv(out):
    from bayes_spectral.models._model_claims import summary_from_csv

    for name in ("heavy_tailed", "spectral_norm", "low_rank_weight_decay"):
        saved = json.loads((out / f"{name}_summary.json").read_text())
        rebuilt = json.loads(json.dumps(V._null_nan(summary_from_csv(name, out / f"{name}.csv"))))
        assert _rows_close(rebuilt, saved) and rebuilt["measurement"] == saved["measurement"]
    with pytest.raises(ValueError, match="unknown reference model"):
        summary_from_csv("nope", out / "spectral_norm.csv")


def _rows_close(a, b):
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        for k, v in rb.items():
            if isinstance(v, float):
                assert ra[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
            else:
                assert ra[k] == v, k
    return True


@pytest.mark.slow
def test_replace_block_and_update_readme(tmp_path, out):
    text = f"# x\n{C.BEGIN}\nold table\n{C.END}\ntail\n"
    assert C.replace_block(text, "| new |\n") == f"# x\n{C.BEGIN}\n| new |\n{C.END}\ntail\n"
    with pytest.raises(ValueError, match="claims:begin"):
        C.replace_block("no markers", "t")
    with pytest.raises(ValueError, match="claims:begin"):
        C.replace_block(f"{C.END}\n{C.BEGIN}", "t")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert C.update_readme(readme, out) is True
    assert C.render_claims(C.load_summaries(out)) in readme.read_text()
    assert readme.read_text().endswith(f"{C.END}\ntail\n")
    assert C.update_readme(readme, out) is False  # idempotent


def test_setting_is_shown_after_the_paper():
    row = V.claim_row("a vs b", "acc", "b", [0.9, 0.91, 0.92], [0.89, 0.9, 0.9])
    with_setting = V.make_summary("m", "P et al.", "c", None, [row], setting="fc3 on digits")
    plain = V.make_summary("m", "P et al.", "c", None, [row])
    table = C.render_claims([with_setting, plain])
    assert "| P et al.; fc3 on digits |" in table and "| P et al. |" in table


def test_load_or_run_reuses_only_a_table_made_under_the_same_settings(tmp_path):
    import dataclasses

    import pandas as pd
    from bayes_spectral.models._common import load_or_run

    @dataclasses.dataclass
    class Cfg:
        seeds: tuple = (0, 1)
        lr: float = 0.1

    calls = []

    def run(config, out_dir=None):
        calls.append(config)
        df = pd.DataFrame({"seed": list(config.seeds),
                           "acc": [config.lr * s for s in config.seeds]})
        df.to_csv(out_dir / "m.csv", index=False)
        return df

    first = load_or_run(run, Cfg(), tmp_path, "m")
    again = load_or_run(run, Cfg(), tmp_path, "m")
    assert len(calls) == 1
    pd.testing.assert_frame_equal(again, first)
    other = load_or_run(run, Cfg(lr=0.2), tmp_path, "m")  # other settings: recomputed
    assert len(calls) == 2 and other.acc.tolist() == [0.0, 0.2]
    assert load_or_run(run, Cfg(lr=0.2), tmp_path, "m").equals(other) and len(calls) == 2


def test_matrix_factorization_claim_rows_only_where_nuclear_misses_the_target():
    """Gatmiry et al.: the flatness-vs-weight-decay rows are taken at the n where the
    nuclear-norm solution has not recovered the target (there "tracks the nuclear-norm
    solution" means something); paired differences by hand."""
    import pandas as pd
    from bayes_spectral.models._model_claims import deep_matrix_factorization_claims

    rows = []
    for n, nuc_err in ((20, 0.6), (30, 0.3), (45, 0.001)):
        for seed in range(3):
            rows.append(dict(num_measurements=n, seed=seed, method="nuclear", depth=0,
                             recovery_error=nuc_err, dist_to_nuclear=0.0))
            for depth in (2, 3):
                rows += [dict(num_measurements=n, seed=seed, method="flatness", depth=depth,
                              recovery_error=0.1, dist_to_nuclear=0.1 + 0.01 * seed),
                         dict(num_measurements=n, seed=seed, method="weight_decay",
                              depth=depth, recovery_error=0.1,
                              dist_to_nuclear=0.3 + 0.02 * seed * depth)]
    summary = deep_matrix_factorization_claims(pd.DataFrame(rows))
    assert [r["comparison"] for r in summary["rows"]] == [
        "n 20, depth 2: flatness vs wd", "n 20, depth 3: flatness vs wd",
        "n 30, depth 2: flatness vs wd", "n 30, depth 3: flatness vs wd"]
    r = summary["rows"][1]  # depth 3: d_s = (0.1 + 0.01 s) - (0.3 + 0.06 s)
    assert r["mean_diff"] == pytest.approx(np.mean([-0.2 - 0.05 * s for s in range(3)]))
    assert r["verdict"] == "reproduced" and "n >= 31" in r["would_change"]
