"""The README's Python examples run as written and give sensible numbers.

Every ```python block of README.md is one test (id: its index and section heading), run in a
fresh namespace inside a temporary working directory, so the files the examples write
("ckpt", "posterior.nc", "spectra.png", ...) land there. Blocks with something to check
beyond "it runs" have an entry in ``CHECKS``, keyed by text that precedes the block.
"""

from __future__ import annotations

import contextlib
import io
import math
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEN_LINE_MARKER = "A prior on a Linear layer, SVI, and an ArviZ summary"


@dataclass(frozen=True)
class Block:
    index: int
    heading: str
    start: int  # offset of the opening fence in README.md
    code: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{self.index}-{slug}"


def python_blocks(text: str) -> list[Block]:
    """Every ```python block with the heading of the section it sits in."""
    blocks = []
    for index, match in enumerate(re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)):
        headings = re.findall(r"^#+ +(.+)$", text[: match.start()], re.M)
        heading = headings[-1] if headings else "top"
        blocks.append(Block(index, heading, match.start(), match.group(1)))
    return blocks


def _block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def _run(code: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    return namespace, out.getvalue()


# --------------------------------------------------------------------------- per-block checks
def check_quick_start(ns: dict, out: str, cwd: pathlib.Path) -> None:
    fit = ns["fit"]  # W is unseeded Gaussian: a Marchenko-Pastur ESD, alpha anywhere above 1
    assert math.isfinite(float(fit.alpha)) and float(fit.alpha) > 1
    assert 2 <= int(fit.num_tail) <= 256 and float(fit.xmin) > 0
    assert ns["ds"].sizes["layer"] == 2 and "alpha" in out


def check_ten_line_svi(ns: dict, out: str, cwd: pathlib.Path) -> None:
    assert len(_block_after(TEN_LINE_MARKER).strip().splitlines()) <= 10
    metrics = ns["res"].evaluate(ns["split"].x_test, ns["split"].y_test)
    assert metrics.accuracy > 0.85  # 5 SVI epochs on digits; chance is 0.1
    post = ns["idata"].posterior
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 50
    assert list(post.layer.values) == ["0"]
    assert "alpha[0]" in out and "stable_rank[0]" in out


def check_bayesian_network(ns: dict, out: str, cwd: pathlib.Path) -> None:
    assert (cwd / "ckpt").is_dir() and any((cwd / "ckpt").iterdir())
    assert ns["res"].evaluate(ns["split"].x_test, ns["split"].y_test).accuracy > 0.85


def check_posterior_spectra(ns: dict, out: str, cwd: pathlib.Path) -> None:
    for name in ("posterior.nc", "spectra.png", "forest.png"):
        assert (cwd / name).stat().st_size > 0, name
    post = ns["idata"].posterior
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 20
    assert list(ns["base"].method.values) == ["weight_decay", "spectral_norm"]


def check_own_model(ns: dict, out: str, cwd: pathlib.Path) -> None:
    import torch

    tokens, labels, res, net = ns["tokens"], ns["labels"], ns["res"], ns["net"]
    assert res.evaluate(tokens[512:], labels[512:]).accuracy > 0.8  # majority class ~0.55
    sites = sorted(ns["bn"].prior_sites)
    assert sites == ["emb"] + [f"enc.layers.0.self_attn.in_proj_weight[{c}]" for c in "kqv"]
    probs = res.predict(tokens[512:]).squeeze(0)
    net_probs = torch.softmax(net.eval()(tokens[512:]), -1)
    assert torch.allclose(probs, net_probs, atol=1e-6)


CHECKS: dict[str, Callable[[dict, str, pathlib.Path], None]] = {
    "## Quick start": check_quick_start,
    TEN_LINE_MARKER: check_ten_line_svi,
    "## Bayesian networks from any PyTorch model": check_bayesian_network,
    "### Your own model": check_own_model,
    "## Posterior spectra with ArviZ": check_posterior_spectra,
}


def _checks_for(text: str, blocks: list[Block]) -> dict[int, Callable]:
    """Each marker names the first python block after it."""
    found = {}
    for marker, check in CHECKS.items():
        at = text.index(marker)
        block = next(b for b in blocks if b.start > at)
        found[block.index] = check
    return found


TEXT = README.read_text()
BLOCKS = python_blocks(TEXT)
BLOCK_CHECKS = _checks_for(TEXT, BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace, out = _run(block.code)
    check = BLOCK_CHECKS.get(block.index)
    if check is not None:
        check(namespace, out, tmp_path)


def test_every_python_block_is_found_and_checked():
    assert len(BLOCKS) == TEXT.count("```python") >= 4
    assert len(BLOCK_CHECKS) == len(CHECKS)  # every marker precedes its own block
    assert BLOCK_CHECKS[python_blocks(TEXT)[1].index] is check_ten_line_svi


def test_python_blocks_extractor_self_test():
    text = "# A\n```python\nx = 1\n```\n## B c\n```bash\nls\n```\n```python\ny = 2\n```\n"
    blocks = python_blocks(text)
    assert [(b.id, b.code) for b in blocks] == [("0-a", "x = 1\n"), ("1-b-c", "y = 2\n")]


# --------------------------------------------------------------------- paths the README cites
def test_every_test_file_the_readme_cites_exists():
    cited = sorted(set(re.findall(r"\btests/[\w/]+\.py\b", TEXT)))
    assert "tests/test_readme.py" in cited and "tests/spectra/test_powerlaw.py" in cited
    missing = [path for path in cited if not (ROOT / path).is_file()]
    assert not missing, f"README.md cites test files that do not exist: {missing}"


# ------------------------------------------------------------- the claims table (issue 22)
def test_claims_table_is_generated_from_the_full_size_results():
    """The README's claims table is `make claims`' rendering of results/*_summary.json, and
    each summary is what its model's own claim builder gives from the saved CSV table, so
    neither the table nor the summaries are typed by hand."""
    import json

    from bayes_spectral.models._model_claims import summary_from_csv
    from bayes_spectral.models._verdicts import _null_nan

    from bayes_spectral.apps.claims import BEGIN, END, load_summaries, render_claims

    results = ROOT / "results"
    block = TEXT[TEXT.index(BEGIN) + len(BEGIN):TEXT.index(END)]
    summaries = load_summaries(results)
    assert block.strip("\n") == render_claims(summaries).strip("\n")
    assert {s["paper"] for s in summaries} >= {
        "Chen et al. 2024", "Chou et al. 2024", "Gatmiry et al. 2023", "Xiao et al. 2023",
        "Yoshida & Miyato 2017"}
    for path in sorted(results.rglob("*_summary.json")):
        name = path.name.removesuffix("_summary.json")
        saved = json.loads(path.read_text())
        rebuilt = json.loads(json.dumps(_null_nan(summary_from_csv(name, path.with_name(
            f"{name}.csv")))))
        assert rebuilt["measurement"] == saved["measurement"], path
        assert [r["verdict"] for r in rebuilt["rows"]] == [r["verdict"] for r in saved["rows"]]
        for ra, rb in zip(rebuilt["rows"], saved["rows"], strict=True):
            for key in ("mean_diff", "ci_low", "ci_high"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-9, abs=1e-12), (path, key)
        # full-size runs: at least 3 seeds in every comparison
        assert min(r["num_seeds"] for r in saved["rows"]) >= 3, path
