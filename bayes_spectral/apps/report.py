"""Layer 6: a self-contained HTML report (tables and PNG plots embedded, no external file).

Images are embedded as ``data:image/png;base64`` URIs, so the one ``report.html`` can be
mailed or archived on its own; the file is written atomically (``_io.write_text_atomic``).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from .._io import write_text_atomic

__all__ = ["write_html_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
"""


def _png_data_uri(path: Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def write_html_report(
    path: str | os.PathLike,
    title: str,
    config: Mapping,
    tables: Mapping[str, pd.DataFrame],
    images: Mapping[str, str | os.PathLike],
    notes: Sequence[str] = (),
    float_format: str = "{:.4g}",
) -> Path:
    """Write ``path`` (HTML): ``notes`` (paragraphs), ``tables`` (caption -> DataFrame),
    ``images`` (caption -> PNG file, embedded) and the ``config`` echoed as JSON."""
    path = Path(path)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    for caption, df in tables.items():
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(df.to_html(float_format=float_format.format, border=0))
    for caption, img in images.items():
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(f"<img alt='{html.escape(caption)}' src='{_png_data_uri(Path(img))}'>")
    parts.append("<h2>Configuration</h2><pre>"
                 + html.escape(json.dumps(dict(config), indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    return write_text_atomic(path, "\n".join(parts))
