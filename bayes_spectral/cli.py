"""Layer 6: the ``bayes-spectral`` command.

Exit codes: 0 success, 2 usage error (argparse, or an impossible setting), 3 unreadable or
unsafe input file, 4 the input had no analysable weight, 5 training stopped on a NaN/Inf
(the message names the parameter and layer; the last good checkpoint is kept), 130
interrupted by Ctrl-C (one line; finished work, checkpoints and saved runs, is kept). Every
error is one line on stderr, never a traceback; settings (seeds, device, ``--out``, numbers,
``--layers``) are checked before anything is trained or written. Seeds are distinct integers
in ``[0, 2**32 - 1]``.

Files: state dicts and ``compare``'s saved runs are read with ``weights_only=True`` (a
pickle that would build any other object is refused, exit 3, naming the file); everything
written goes through the atomic writer (:mod:`bayes_spectral._io`), so a kill leaves the old
file or the new one. ``fit`` refuses an ``--out`` holding an earlier fit (a checkpoint or
``metrics.json``) unless ``--resume`` (continue it) or ``--overwrite`` (replace it) is given,
and writes ``config.json`` only once ``fit`` has accepted the settings. ``compare`` holds the
lock file ``OUT/.compare.lock`` while it runs: a second ``compare`` on the same ``--out``
exits 2 at once instead of training the same runs; runs saved with other settings (epochs,
widths, data set, ...) are refused by name (exit 2; ``--no-resume`` retrains them).

``--plugin MODULE`` (before the subcommand, repeatable) imports a user's module first, so
the priors, penalties and data sets it registers (``bayes_spectral.distributions.PRIORS``,
``bayes_spectral.penalties.PENALTIES``, ``bayes_spectral.data.DATASETS``) are valid choices
of ``--priors`` / ``--prior`` / ``--baselines`` / ``--dataset``; a module that cannot be
imported is a usage error (exit 2, one line naming it).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

EXIT_BAD_FILE = 3
EXIT_NO_LAYERS = 4
EXIT_NON_FINITE = 5
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_EXAMPLES = """examples:
  bayes-spectral compare                       # the main job (a few minutes)
  bayes-spectral compare --quick --out report/ # under a minute
  bayes-spectral fit --prior powerlaw --method svi --out run1/ --resume
  bayes-spectral analyze --example digits-mlp
  bayes-spectral analyze model.pt --out report/
  bayes-spectral analyze model.safetensors --layers 'fc|conv'
  bayes-spectral reproduce deep_matrix_factorization --small --out out/
"""

_TABLE_COLUMNS = ["layer_type", "shape", "num_evals", "alpha", "xmin", "num_tail",
                  "ks_distance", "alpha_weighted", "log_spectral_norm", "log_norm",
                  "stable_rank", "effective_rank"]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``.

    Accepts a plain state_dict or a dict holding one under ``state_dict`` / ``model``.
    Raises :class:`~bayes_spectral._io.UnreadableFileError` (a ``ValueError``) naming the
    file, and the tensor where one is at fault (sparse, meta-device), for anything else;
    never unpickles objects.
    """
    from ._io import UnreadableFileError, load_tensors

    if not path.is_file():
        raise UnreadableFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _check_tensors(path, load_file(str(path)))
        except UnreadableFileError:
            raise
        except Exception as err:  # safetensors raises its own error types
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UnreadableFileError(f"{path}: not a valid safetensors file ({reason})") from err
    obj = load_tensors(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnreadableFileError(f"{path}: expected a state_dict (a dict of tensors)")
    return _check_tensors(path, obj)


def _check_tensors(path: Path, state: dict) -> dict[str, torch.Tensor]:
    """Every tensor dense (strided) and holding data (not on the meta device)."""
    from ._io import UnreadableFileError

    for name, t in state.items():
        if t.layout != torch.strided:
            raise UnreadableFileError(f"{path}: tensor {name!r} is sparse ({t.layout}); save "
                                      "dense tensors (tensor.to_dense())")
        if t.device.type == "meta":
            raise UnreadableFileError(f"{path}: tensor {name!r} is on the meta device (shape "
                                      "only, no values); save materialised weights")
    return state


def _example_model(name: str, seed: int) -> nn.Module:
    """The embedded example: a 64-256-128-10 MLP trained by Adam (30 epochs) on the digits."""
    if name != "digits-mlp":
        raise ValueError(f"unknown example {name!r}; available: digits-mlp")
    from .apps.nets import make_mlp, train_adam
    from .data import load_digits

    data = load_digits(seed=seed)
    model = make_mlp(64, (256, 128), 10, seed, named=False)
    train_adam(model, data.x_train, data.y_train, epochs=30, batch_size=64, lr=1e-3)
    with torch.no_grad():
        acc = (model(data.x_test).argmax(-1) == data.y_test).float().mean()
    print(f"example digits-mlp: 64-256-128-10 MLP, Adam 30 epochs, test accuracy {acc:.3f}")
    return model


def _fail(message, code: int) -> int:
    """Print ``error: <first line of message>`` on stderr; return ``code``."""
    line = (str(message).strip().splitlines() or [type(message).__name__])[0]
    print(f"error: {line}", file=sys.stderr)
    return code


def _check_layers(regex: str | None) -> None:
    """``--layers`` compiles as a regular expression; ``ValueError`` naming it otherwise."""
    if regex is None:
        return
    try:
        re.compile(regex)
    except re.error as err:
        raise ValueError(f"--layers {regex!r}: not a valid regular expression ({err})") from err


def cmd_analyze(args: argparse.Namespace) -> int:
    from ._io import check_writable_dir
    from .apps.settings import check_seed

    try:
        _check_layers(args.layers)
        check_seed(args.seed, "--seed")
        out = None if not args.out else check_writable_dir(args.out)
    except ValueError as err:
        return _fail(err, EXIT_USAGE)
    if args.example:
        model = _example_model(args.example, args.seed)
    else:
        try:
            model = load_state_dict(Path(args.path))
        except ValueError as err:
            return _fail(err, EXIT_BAD_FILE)
    from .diagnostics.analyze import analyze

    try:
        ds = analyze(model, layers=args.layers, conv=args.conv, return_esd=bool(out))
    except ValueError as err:
        return _fail(err, EXIT_NO_LAYERS)
    _print_and_write_analysis(ds, out)
    return 0


def _print_and_write_analysis(ds, out: Path | None) -> None:
    """Print the table; with ``out``, write ``analysis.csv`` and ``esd.png`` atomically."""
    import pandas as pd

    from ._io import atomic_path, write_atomic

    table = ds.drop_vars(["esd"], errors="ignore").to_dataframe()[_TABLE_COLUMNS]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string())
    if out is None:
        return
    write_atomic(out / "analysis.csv", table.to_csv)
    from .diagnostics.plots import plot_esds

    spectra = {}
    for name in ds.layer.values:
        row = ds.esd.sel(layer=name).values
        spectra[str(name)] = torch.as_tensor(row[~np.isnan(row)])
    with atomic_path(out / "esd.png") as tmp:
        plot_esds(spectra, tmp)
    print(f"wrote {out / 'analysis.csv'} and {out / 'esd.png'}")


def cmd_reproduce(args: argparse.Namespace) -> int:
    import pandas as pd

    from ._io import check_writable_dir
    from .apps.settings import check_seed

    try:
        if args.seed is not None:
            check_seed(args.seed, "--seed")
        if args.out:
            check_writable_dir(args.out)
    except ValueError as err:
        return _fail(err, EXIT_USAGE)
    from .models import get_model

    module = get_model(args.name)
    config = module.Config.small() if args.small else module.Config()
    if args.seed is not None:
        config.seeds = (args.seed,)
    print(f"reproduce {args.name} ({'small' if args.small else 'full'} config): {config}")
    table = module.run(config, out_dir=args.out)
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.max_rows", 200, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    if args.out:
        print(f"wrote {args.out}/{args.name}.csv and {args.name}.png")
    return 0


def _config_from_args(args: argparse.Namespace):
    from .apps.compare import CompareConfig

    cfg = CompareConfig.quick() if args.quick else CompareConfig()
    for key in ("dataset", "epochs", "svi_epochs", "batch_size", "lr", "device"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.seeds is not None:
        cfg.seeds = tuple(args.seeds)
    if args.hidden is not None:
        cfg.hidden = tuple(args.hidden)
    if args.baselines is not None:
        cfg.baselines = tuple(args.baselines)
    if args.priors is not None:
        cfg.priors = tuple(args.priors)
    if args.no_svi:
        cfg.svi = False
    return cfg


def cmd_compare(args: argparse.Namespace) -> int:
    """Settings and ``--out`` are checked before the first run trains; one ``compare`` per
    ``--out`` at a time (lock file ``OUT/.compare.lock``: a second one exits 2)."""
    from ._io import FolderLockedError, UnreadableFileError, check_writable_dir, folder_lock
    from .apps.compare import (
        LOCK_NAME,
        SettingsMismatchError,
        compare,
        format_summary,
        write_outputs,
    )
    from .bnn.fit import NonFiniteError

    cfg = _config_from_args(args)
    try:
        cfg.validate()
        out = check_writable_dir(args.out)
    except ValueError as err:
        return _fail(err, EXIT_USAGE)
    print(f"compare ({'quick' if args.quick else 'full'}): {cfg}")
    try:
        with folder_lock(out, LOCK_NAME, what="compare"):
            result = compare(cfg, out_dir=out, resume=not args.no_resume)
            print(format_summary(result["table"]))
            paths = write_outputs(result, out)
    except (FolderLockedError, SettingsMismatchError) as err:
        return _fail(err, EXIT_USAGE)
    except UnreadableFileError as err:
        return _fail(err, EXIT_BAD_FILE)
    except NonFiniteError as err:
        return _fail(err, EXIT_NON_FINITE)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _check_fit_args(args: argparse.Namespace) -> None:
    """Every number, the seed and the device of ``fit``, before anything is written."""
    from .apps.settings import check_device, check_positive, check_positive_int, check_seed

    check_seed(args.seed, "--seed")
    check_device(args.device)
    for flag in ("epochs", "batch_size", "num_samples", "chains"):
        check_positive_int(getattr(args, flag), "--" + flag.replace("_", "-"))
    check_positive(args.lr, "--lr")
    if not args.hidden or any(h < 1 for h in args.hidden):
        raise ValueError(f"--hidden must be positive layer widths, got {args.hidden}")


def _earlier_fit(out: Path, args: argparse.Namespace) -> None:
    """Refuse to replace an earlier run's results unless ``--resume`` or ``--overwrite``."""
    if args.resume or args.overwrite:
        return
    for found in (out / "checkpoint" / "checkpoint.pt", out / "metrics.json"):
        if found.exists():
            raise ValueError(f"{found}: an earlier fit is there; pass --resume to continue "
                             "it or --overwrite to replace it")


def _fit_setup(args: argparse.Namespace):
    """``(split, bayesian net, out folder)`` after every check passed (nothing written)."""
    from ._io import check_writable_dir
    from .apps.compare import load_dataset
    from .apps.nets import make_mlp
    from .bnn.build import bayesian
    from .distributions import PRIORS

    _check_fit_args(args)
    out = check_writable_dir(args.out)
    _earlier_fit(out, args)
    split = load_dataset(args.dataset, seed=args.seed)
    net = make_mlp(split.x_train.shape[1], tuple(args.hidden),
                   int(split.y_train.max()) + 1, args.seed)
    bn = bayesian(net, {nn.Linear: PRIORS.get(args.prior)}, num_data=len(split.x_train))
    return split, bn, out


def cmd_fit(args: argparse.Namespace) -> int:
    """``config.json`` is written once ``fit`` has accepted the settings (it trained, or
    stopped after a checkpoint), never before; ``metrics.json`` on success."""
    import json
    import time

    from ._io import UnreadableFileError, write_text_atomic
    from .bnn.fit import NonFiniteError, fit

    if args.method == "nuts" and sum(args.hidden) > 64:
        print("note: NUTS on more than a few thousand weights is slow; try --hidden 16",
              file=sys.stderr)
    try:
        split, bn, out = _fit_setup(args)
    except (ValueError, TypeError) as err:
        return _fail(err, EXIT_USAGE)
    config = {k: v for k, v in vars(args).items()
              if k != "func" and not (k == "plugin" and v is None)}
    print(f"fit {args.method} with prior {args.prior} on {args.dataset}: {config}")
    ckpt, started, ok = out / "checkpoint" / "checkpoint.pt", time.time(), False
    try:
        res = fit(bn, split, args.method, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, device=args.device, seed=args.seed,
                  val_data=None if args.method == "nuts" else (split.x_test, split.y_test),
                  checkpoint_dir=None if args.method == "nuts" else out / "checkpoint",
                  resume=args.resume, num_samples=args.num_samples,
                  warmup_steps=args.num_samples, num_chains=args.chains)
        ok = True
    except UnreadableFileError as err:
        return _fail(err, EXIT_BAD_FILE)
    except NonFiniteError as err:
        return _fail(err, EXIT_NON_FINITE)
    except (ValueError, TypeError) as err:
        return _fail(err, EXIT_USAGE)
    finally:
        if ok or (ckpt.exists() and ckpt.stat().st_mtime >= started):
            write_text_atomic(out / "config.json", json.dumps(config, indent=2))
    metrics = {k: float(v) for k, v in res.evaluate(split.x_test, split.y_test)._asdict().items()}
    metrics["epochs_run"] = res.epochs_run
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    print("test " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    print(f"wrote {out / 'metrics.json'}" + ("" if args.method == "nuts" else
                                              f" and {out / 'checkpoint'}"))
    return 0


def _add_analyze_parser(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-layer spectral metrics of a checkpoint (WeightWatcher-style table)",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("path", nargs="?", help="state_dict file (.pt/.pth via weights_only "
                     "loading, or .safetensors)")
    src.add_argument("--example", choices=["digits-mlp"], help="train and analyse an "
                     "embedded example model instead of a file")
    p.add_argument("--layers", default=None, help="regular expression selecting layer names")
    p.add_argument("--conv", choices=["pool", "flatten"], default="pool",
                   help="conv kernels: pool the k*k slices' ESDs (default) or flatten")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default=None, help="folder for analysis.csv")
    p.set_defaults(func=cmd_analyze)


def _add_compare_parser(sub) -> None:
    from .data import DATASETS
    from .distributions import PRIORS
    from .penalties import PENALTIES

    c = sub.add_parser(
        "compare",
        help="the main job: every baseline penalty and spectral prior (MAP, SVI) on one MLP",
        description="Train one MLP with every baseline penalty (none, weight decay, spectral "
                    "norm, stable rank, weighted alpha) and every spectral prior (MAP, then SVI "
                    "from the MAP fit) over seeds; print a results table and write a report "
                    "folder (results.csv, summary.csv, plots, report.html).",
        epilog="examples:\n  bayes-spectral compare\n  bayes-spectral compare --quick --out r/"
               "\n  bayes-spectral compare --priors powerlaw --baselines none weight_decay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--quick", action="store_true", help="under a minute: smaller MLP, 2 seeds")
    c.add_argument("--dataset", choices=DATASETS.names(), default=None)
    c.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    c.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths")
    c.add_argument("--epochs", type=int, default=None)
    c.add_argument("--svi-epochs", dest="svi_epochs", type=int, default=None)
    c.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    c.add_argument("--lr", type=float, default=None)
    c.add_argument("--baselines", nargs="*", default=None, choices=PENALTIES.names())
    c.add_argument("--priors", nargs="*", default=None, choices=PRIORS.names())
    c.add_argument("--no-svi", dest="no_svi", action="store_true", help="MAP only")
    c.add_argument("--device", default=None, help="cpu (default) or cuda")
    c.add_argument("--out", default="report", help="report folder (default: report/)")
    c.add_argument("--no-resume", dest="no_resume", action="store_true",
                   help="retrain runs already saved under OUT/runs/")
    c.set_defaults(func=cmd_compare)


def _add_fit_parser(sub) -> None:
    from .data import DATASETS
    from .distributions import PRIORS

    f = sub.add_parser(
        "fit",
        help="fit one Bayesian MLP (prior, method map/svi/nuts) with checkpoints and --resume",
        epilog="examples:\n  bayes-spectral fit --prior powerlaw --method map --out run1/\n"
               "  bayes-spectral fit --prior gaussian --method nuts --hidden 8 --out n1/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--prior", choices=PRIORS.names(), default="powerlaw")
    f.add_argument("--method", choices=["map", "svi", "nuts"], default="map")
    f.add_argument("--dataset", choices=DATASETS.names(), default="digits")
    f.add_argument("--hidden", type=int, nargs="+", default=[64])
    f.add_argument("--epochs", type=int, default=20)
    f.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    f.add_argument("--lr", type=float, default=3e-3)
    f.add_argument("--num-samples", dest="num_samples", type=int, default=200,
                   help="NUTS: draws (and warm-up steps) per chain")
    f.add_argument("--chains", type=int, default=2, help="NUTS chains")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="cpu")
    f.add_argument("--out", default="fit-run", help="folder: checkpoint/, metrics.json")
    f.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint/checkpoint.pt if present")
    f.add_argument("--overwrite", action="store_true",
                   help="replace an earlier fit in OUT (without it, or --resume, an OUT "
                        "holding a checkpoint or metrics.json is refused, exit 2)")
    f.set_defaults(func=cmd_fit)


def _add_reproduce_parser(sub) -> None:
    from .models import REFERENCE_MODELS

    r = sub.add_parser(
        "reproduce",
        help="run a reference model of one of the papers (see bayes_spectral.models)",
        description="\n".join(f"  {k}: {v}" for k, v in REFERENCE_MODELS.items()),
        epilog="example:\n  bayes-spectral reproduce low_rank_weight_decay --small --out out/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("name", choices=sorted(REFERENCE_MODELS))
    r.add_argument("--small", action="store_true", help="the seconds-long test configuration")
    r.add_argument("--seed", type=int, default=None, help="run a single seed")
    r.add_argument("--out", default=None, help="folder for the CSV table and PNG plot")
    r.set_defaults(func=cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    """The ``bayes-spectral`` parser. Registry choices (priors, baselines, data sets) are
    read now: import plugins (:func:`load_plugins`) before calling it."""
    parser = argparse.ArgumentParser(
        prog="bayes-spectral",
        description="Spectral diagnosis and spectral priors for PyTorch networks.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--plugin", action="append", default=None, metavar="MODULE",
                        help="import MODULE first (repeatable), so the priors, penalties and "
                             "data sets it registers are valid choices")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_analyze_parser(sub)
    _add_compare_parser(sub)
    _add_fit_parser(sub)
    _add_reproduce_parser(sub)
    return parser


def plugin_names(argv: list[str]) -> list[str]:
    """The values of ``--plugin`` given before the subcommand, in order (``--plugin M``,
    ``--plugin=M`` or an abbreviation such as ``--plug M``, as argparse accepts them)."""
    names, i = [], 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        opt, eq, value = argv[i].partition("=")
        if len(opt) > 2 and "--plugin".startswith(opt):
            if eq:
                names.append(value)
            elif i + 1 < len(argv):
                names.append(argv[i + 1])
                i += 1
        i += 1
    return names


def load_plugins(names: list[str]) -> None:
    """Import each module of ``names`` (its registrations run at import); ``ValueError``
    with one line naming the first one that cannot be imported, and why."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure of a user's module is a usage error
            reason = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"--plugin {name!r} cannot be imported "
                             f"({type(err).__name__}: {reason})") from err


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bayes-spectral`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        load_plugins(plugin_names(argv))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        kept = f"; files already written under {out} are kept" if out else ""
        print(f"interrupted (Ctrl-C){kept}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
