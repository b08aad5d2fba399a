"""Test configuration.

``models/`` is installed as ``bayes_spectral.models`` (setuptools package-dir mapping). From a
plain source checkout (``PYTHONPATH=<repo>``, nothing installed) that name does not exist, so
register it here; when the package is installed (CI: editable install) this does nothing.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _register_models() -> None:
    try:
        if importlib.util.find_spec("bayes_spectral.models") is not None:
            return
    except ModuleNotFoundError:  # pragma: no cover - bayes_spectral itself missing
        return
    models_dir = _ROOT / "models"
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
