"""Test configuration.

``models/`` is installed as ``bayes_spectral.models`` (setuptools package-dir mapping). From a
plain source checkout (``PYTHONPATH=<repo>``) that name either does not exist or, when another
checkout is installed in editable mode, points at *that* checkout's ``models/``. In both cases
register this checkout's folder under the name; when ``bayes_spectral.models`` already resolves
to this checkout (CI: editable install of the tree under test) this does nothing.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _register_models() -> None:
    models_dir = _ROOT / "models"
    try:
        found = importlib.util.find_spec("bayes_spectral.models")
    except ModuleNotFoundError:  # pragma: no cover - bayes_spectral itself missing
        return
    if found is not None and found.origin is not None:
        if pathlib.Path(found.origin).resolve().parent == models_dir:
            return
    spec = importlib.util.spec_from_file_location(
        "bayes_spectral.models",
        models_dir / "__init__.py",
        submodule_search_locations=[str(models_dir)],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bayes_spectral.models"] = module
    spec.loader.exec_module(module)
    import bayes_spectral

    bayes_spectral.models = module


_register_models()

# Under pytest-xdist each worker is its own process: two workers x two intra-op threads
# oversubscribe the 2-core CI machine and make some linear algebra 10x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
