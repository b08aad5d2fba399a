"""The README's Python examples run as written and give sensible numbers."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_ten_line_svi_example_runs_and_learns():
    code = _block_after("A prior on a Linear layer, SVI, and an ArviZ summary")
    assert len(code.strip().splitlines()) <= 10
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    metrics = namespace["res"].evaluate(namespace["split"].x_test, namespace["split"].y_test)
    assert metrics.accuracy > 0.85  # 5 SVI epochs on digits; chance is 0.1
    post = namespace["idata"].posterior
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 50
    assert list(post.layer.values) == ["0"]
    assert "alpha[0]" in out.getvalue() and "stable_rank[0]" in out.getvalue()
