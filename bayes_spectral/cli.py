"""Layer 6: the ``bayes-spectral`` command.

Exit codes: 0 success, 2 usage error (argparse, or an impossible setting), 3 unreadable or
unsafe input file, 4 the input had no analysable weight, 5 training stopped on a NaN/Inf
(the message names the parameter and layer; the last good checkpoint is kept).

``--plugin MODULE`` (before the subcommand, repeatable) imports a user's module first, so
the priors, penalties and data sets it registers (``bayes_spectral.distributions.PRIORS``,
``bayes_spectral.penalties.PENALTIES``, ``bayes_spectral.data.DATASETS``) are valid choices
of ``--priors`` / ``--prior`` / ``--baselines`` / ``--dataset``; a module that cannot be
imported is a usage error (exit 2, one line naming it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

EXIT_BAD_FILE = 3
EXIT_NO_LAYERS = 4
EXIT_NON_FINITE = 5
EXIT_USAGE = 2

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
    Raises ``ValueError`` with the reason for anything else (never unpickles objects).
    """
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a valid safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path}: cannot be loaded safely with torch.load(weights_only=True): "
            f"{str(err).splitlines()[0]}"
        ) from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors)")
    return obj


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


def cmd_analyze(args: argparse.Namespace) -> int:
    import pandas as pd

    from .diagnostics.analyze import analyze

    if args.example:
        model = _example_model(args.example, args.seed)
    else:
        try:
            state = load_state_dict(Path(args.path))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_FILE
        model = state
    try:
        ds = analyze(model, layers=args.layers, conv=args.conv, return_esd=bool(args.out))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_LAYERS
    table = ds.drop_vars(["esd"], errors="ignore").to_dataframe()[_TABLE_COLUMNS]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "analysis.csv")
        from .diagnostics.plots import plot_esds

        spectra = {}
        for name in ds.layer.values:
            row = ds.esd.sel(layer=name).values
            spectra[str(name)] = torch.as_tensor(row[~np.isnan(row)])
        plot_esds(spectra, out / "esd.png")
        print(f"wrote {out / 'analysis.csv'} and {out / 'esd.png'}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import pandas as pd

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
    from .apps.compare import compare, format_summary, write_outputs
    from .bnn.fit import NonFiniteError

    cfg = _config_from_args(args)
    try:
        cfg.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"compare ({'quick' if args.quick else 'full'}): {cfg}")
    try:
        result = compare(cfg, out_dir=args.out, resume=not args.no_resume)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE
    print(format_summary(result["table"]))
    paths = write_outputs(result, args.out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import json

    from ._io import write_text_atomic
    from .apps.compare import load_dataset
    from .apps.nets import make_mlp
    from .bnn.build import bayesian
    from .bnn.fit import NonFiniteError, fit
    from .distributions import PRIORS

    if args.method == "nuts" and sum(args.hidden) > 64:
        print("note: NUTS on more than a few thousand weights is slow; try --hidden 16",
              file=sys.stderr)
    try:
        split = load_dataset(args.dataset, seed=args.seed)
        net = make_mlp(split.x_train.shape[1], tuple(args.hidden),
                       int(split.y_train.max()) + 1, args.seed)
        bn = bayesian(net, {nn.Linear: PRIORS.get(args.prior)}, num_data=len(split.x_train))
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()
              if k != "func" and not (k == "plugin" and v is None)}
    write_text_atomic(out / "config.json", json.dumps(config, indent=2))
    print(f"fit {args.method} with prior {args.prior} on {args.dataset}: {config}")
    try:
        res = fit(bn, split, args.method, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, device=args.device, seed=args.seed,
                  val_data=None if args.method == "nuts" else (split.x_test, split.y_test),
                  checkpoint_dir=None if args.method == "nuts" else out / "checkpoint",
                  resume=args.resume, num_samples=args.num_samples,
                  warmup_steps=args.num_samples, num_chains=args.chains)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE
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
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
