"""The layer rule of DESIGN.md, read from the source with ``ast``.

Layers: 1 spectra, 2 distributions, 3 penalties, 4 bnn, 5 diagnostics, 6 apps (``apps/``,
``cli``, ``models`` (installed as ``bayes_spectral.models``), the ``distributed`` shim and the
package root ``bayes_spectral/__init__``). A module may import its own layer or a LOWER one.
The top-level ``_checks``, ``_io``, ``registry``, ``select`` (and its private ``_view_rows``)
and ``data`` are shared: every module may import them; they import no layer >= 2
(``/work/notes/common.md``), and ``data`` imports nothing of the library but ``registry``,
``_checks`` and ``_io``.

Every import counts: module level, function level, under ``TYPE_CHECKING``, relative ones
(resolved against the importing module's package) and ``importlib.import_module("...")``
with a literal name. ``from package import name`` counts as an import of the submodule
``package.name`` when that file exists, otherwise of ``package`` itself.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "bayes_spectral"
SOURCE_DIRS = {PACKAGE: ROOT / "bayes_spectral", f"{PACKAGE}.models": ROOT / "models"}

LAYERS = {
    "spectra": 1,
    "distributions": 2,
    "penalties": 3,
    "bnn": 4,
    "diagnostics": 5,
    "apps": 6,
    "cli": 6,
    "models": 6,
    "distributed": 6,
}
SHARED = {"_checks", "_io", "registry", "select", "_view_rows", "data"}
DATA_MAY_IMPORT = {f"{PACKAGE}.{name}" for name in ("registry", "_checks", "_io")}
LAYER_NAMES = {0: "shared", 1: "spectra", 2: "distributions", 3: "penalties", 4: "bnn",
               5: "diagnostics", 6: "apps"}


def discover_modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Absolute module name -> (file, is_package) for every ``.py`` file of the library."""
    modules: dict[str, tuple[pathlib.Path, bool]] = {}
    for prefix, folder in SOURCE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = (path, is_package)
    return modules


def layer_of(module: str) -> int | None:
    """0 for shared modules, 1-6 for the layers, None for anything outside the library."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return 6  # the package root re-exports everything
    if parts[1] in SHARED:
        return 0
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    raise AssertionError(f"{module}: no layer assigned; add it to LAYERS or SHARED")


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(package) - 1:
        raise AssertionError(f"{module}: relative import beyond the top-level package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _literal_import_module(node: ast.Call) -> str | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name != "import_module" or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Every module named by an import statement anywhere in ``source``, as absolute names."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append(candidate if candidate in known else base)
        elif isinstance(node, ast.Call):
            name = _literal_import_module(node)
            if name is not None and not name.startswith("."):
                found.append(name)
    return found


def violations_of(module: str, imported: list[str]) -> list[tuple[str, str, str]]:
    """(module, imported module, 'layer -> layer') for every import of a forbidden layer."""
    own = layer_of(module)
    bad = []
    for target in imported:
        other = layer_of(target)
        if other is None:
            continue
        if module == f"{PACKAGE}.data":
            forbidden = target not in DATA_MAY_IMPORT
        elif own == 0:
            forbidden = other >= 2
        else:
            forbidden = other > own
        if forbidden:
            arrow = f"{LAYER_NAMES[own]} ({own}) -> {LAYER_NAMES[other]} ({other})"
            bad.append((module, target, arrow))
    return bad


def scan() -> tuple[dict[str, list[str]], list[tuple[str, str, str]]]:
    modules = discover_modules()
    known = set(modules)
    imports, bad = {}, []
    for name, (path, is_package) in modules.items():
        imports[name] = imports_of(path.read_text(), name, is_package, known)
        bad.extend(violations_of(name, imports[name]))
    return imports, bad


def test_no_module_imports_a_higher_layer():
    imports, bad = scan()
    assert len(imports) > 30, f"only {len(imports)} modules found: wrong source folders?"
    assert sum(map(len, imports.values())) > 100
    listing = "\n".join(f"  {m} imports {t}: {arrow}" for m, t, arrow in sorted(set(bad)))
    assert not bad, f"{len(set(bad))} upward import(s):\n{listing}"


def test_every_module_has_a_layer():
    for name in discover_modules():
        layer_of(name)  # raises for an unassigned top-level module


# ---------------------------------------------------------------- self-tests of the scanner
KNOWN = {
    "bayes_spectral.spectra.fake",
    "bayes_spectral.diagnostics",
    "bayes_spectral.diagnostics.plots",
    "bayes_spectral.bnn",
    "bayes_spectral.bnn.network",
    "bayes_spectral.penalties.norms",
    "bayes_spectral.data",
    "bayes_spectral.registry",
    "bayes_spectral._checks",
    "bayes_spectral.select",
}


def test_scanner_finds_a_function_level_relative_upward_import():
    source = "import torch\n\ndef f():\n    from ..diagnostics import plots\n    return plots\n"
    found = imports_of(source, "bayes_spectral.spectra.fake", False, KNOWN)
    assert found == ["torch", "bayes_spectral.diagnostics.plots"]
    assert violations_of("bayes_spectral.spectra.fake", found) == [
        ("bayes_spectral.spectra.fake", "bayes_spectral.diagnostics.plots",
         "spectra (1) -> diagnostics (5)")
    ]


@pytest.mark.parametrize(
    "module, is_package, source, expected",
    [
        ("bayes_spectral.bnn.network", False, "from ..penalties.norms import L1", []),
        ("bayes_spectral.bnn.network", False, "from .. import data", []),
        ("bayes_spectral.bnn", True, "from . import network", []),
        ("bayes_spectral.bnn.network", False, "import bayes_spectral as bs", ["bayes_spectral"]),
        ("bayes_spectral.bnn.network", False,
         "if TYPE_CHECKING:\n    from bayes_spectral.diagnostics import plots",
         ["bayes_spectral.diagnostics.plots"]),
        ("bayes_spectral.penalties.norms", False,
         "import importlib\nm = importlib.import_module('bayes_spectral.bnn.network')",
         ["bayes_spectral.bnn.network"]),
        ("bayes_spectral.data", False, "from .spectra.spectrum import esd",
         ["bayes_spectral.spectra.spectrum"]),
        ("bayes_spectral._io", False, "from . import registry, _checks", []),
        ("bayes_spectral.select", False, "from .spectra.spectrum import as_matrices", []),
        ("bayes_spectral.select", False, "from .distributions import Frechet",
         ["bayes_spectral.distributions"]),
        ("bayes_spectral.data", False, "from . import registry, select",
         ["bayes_spectral.select"]),
        ("bayes_spectral.models.fake", False, "from ..apps.compare import make_mlp", []),
    ],
)
def test_scanner_classifies_imports(module, is_package, source, expected):
    found = imports_of(source, module, is_package, KNOWN)
    assert [target for _, target, _ in violations_of(module, found)] == expected


def test_relative_import_resolution():
    assert _resolve_relative("bayes_spectral.bnn.network", False, 1, "guides") == (
        "bayes_spectral.bnn.guides")
    assert _resolve_relative("bayes_spectral.bnn.network", False, 2, None) == "bayes_spectral"
    assert _resolve_relative("bayes_spectral.bnn", True, 1, "fit") == "bayes_spectral.bnn.fit"
    assert _resolve_relative("bayes_spectral", True, 1, "_io") == "bayes_spectral._io"
    assert _resolve_relative("bayes_spectral.models.x", False, 2, "cli") == "bayes_spectral.cli"
