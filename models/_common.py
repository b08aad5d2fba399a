"""Small helpers shared by the reference models (private)."""

from __future__ import annotations

import contextlib
import pathlib

import torch

from bayes_spectral._io import atomic_path, write_atomic


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run the block with ``torch.set_num_threads(num_threads)``; restore afterwards.

    The reference models train many tiny networks: one intra-op thread is fastest there
    and avoids oversubscription when several runs share a machine. ``None`` leaves torch's
    setting alone.
    """
    if num_threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_results(df, out_dir, name: str, plot) -> None:
    """Write ``<out_dir>/<name>.csv`` and ``<name>.png`` (``plot(df, path)``); no-op if None."""
    if out_dir is None:
        return
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / f"{name}.csv", lambda tmp: df.to_csv(tmp, index=False))
    with atomic_path(path / f"{name}.png") as tmp:
        plot(df, pathlib.Path(tmp))


def new_figure(ncols: int, width: float = 4.5, height: float = 3.5):
    """A matplotlib figure with ``ncols`` axes, using the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def save_figure(fig, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config_record(config) -> dict:
    """``config`` (a dataclass) as plain JSON data, e.g. tuples as lists."""
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(config)))


def write_config(out_dir, name: str, config) -> pathlib.Path:
    """Write ``<out_dir>/<name>_config.json``: the settings a saved table was made with."""
    import json

    from bayes_spectral._io import write_text_atomic

    path = pathlib.Path(out_dir) / f"{name}_config.json"
    return write_text_atomic(path, json.dumps(config_record(config), indent=1) + "\n")


def load_or_run(run, config, out_dir, name: str):
    """The table ``run(config, out_dir=out_dir)`` gives, read back from
    ``<out_dir>/<name>.csv`` when ``<name>_config.json`` there records the same settings
    (the committed full-size results), else computed, saved and recorded. A saved table made
    under other settings is never reused: it is recomputed."""
    import json

    import pandas as pd

    folder = pathlib.Path(out_dir)
    table, record = folder / f"{name}.csv", folder / f"{name}_config.json"
    if table.is_file() and record.is_file():
        if json.loads(record.read_text()) == config_record(config):
            return pd.read_csv(table)
    df = run(config, out_dir=folder)
    write_config(folder, name, config)
    return df
