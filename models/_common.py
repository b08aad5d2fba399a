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
