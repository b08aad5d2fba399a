"""Layer 6: the ``bayes-spectral`` command.

Exit codes: 0 success, 2 usage error (argparse, or an impossible setting; ``analyze``: a
resume folder or ``--base`` that does not fit), 3 unreadable or unsafe input file (a
truncated shard, an index naming a missing shard, an unreadable header: the file and the
tensor named), 4 the input had no analysable weight, 5 training stopped on a NaN/Inf
(the message names the parameter and layer; the last good checkpoint is kept), or
``analyze --strict`` met a tensor holding NaN/Inf (file and tensor named), 130
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
import contextlib
import importlib
import re
import sys
from pathlib import Path

import torch
from torch import nn

EXIT_BAD_FILE = 3
EXIT_NO_LAYERS = 4
EXIT_NON_FINITE = 5
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_EXAMPLES = """examples:
  bayes-spectral compare                       # the main job (a few minutes)
  bayes-spectral compare --quick --out report/ # about a minute
  bayes-spectral fit --prior powerlaw --method svi --out run1/ --resume
  bayes-spectral analyze --example digits-mlp
  bayes-spectral analyze model.pt --out report/
  bayes-spectral analyze model.safetensors --layers 'fc|conv'
  bayes-spectral reproduce deep_matrix_factorization --small --out out/
"""

_TABLE_COLUMNS = ["layer_type", "shape", "num_evals", "alpha", "xmin", "num_tail",
                  "ks_distance", "alpha_weighted", "log_spectral_norm", "log_norm",
                  "stable_rank", "effective_rank"]
#: columns of analyze's WeightWatcher options, printed when the dataset has them
_OPTION_COLUMNS = ["Lambda", "num_fingers", "raw_alpha", "sigma_mp", "num_spikes", "bulk_min",
                   "bulk_max", "mp_softrank", "rand_distance", "ww_softrank", "num_traps",
                   "warning"]


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


def _check_layers(regex: str | None, flag: str = "--layers") -> None:
    """``--layers`` compiles as a regular expression; ``ValueError`` naming it otherwise."""
    if regex is None:
        return
    try:
        re.compile(regex)
    except re.error as err:
        raise ValueError(f"{flag} {regex!r}: not a valid regular expression ({err})") from err


def cmd_analyze(args: argparse.Namespace) -> int:
    from ._io import check_writable_dir
    from .apps.settings import check_seed

    try:
        _check_layers(args.layers)
        _check_layers(args.esd_layers, "--esd-layers")
        check_seed(args.seed, "--seed")
        _check_analyze_numbers(args)
        out = None if not args.out else check_writable_dir(args.out)
    except ValueError as err:
        return _fail(err, EXIT_USAGE)
    model = _example_model(args.example, args.seed) if args.example else args.path
    code, ds = _run_analyze(args, model, out)
    if ds is None:
        return code
    _print_and_write_analysis(ds, out, args.example or args.path, args.esd_layers)
    return 0


def _check_analyze_numbers(args: argparse.Namespace) -> None:
    """``--max-aspect`` > 1, ``--heads``, ``--kv-heads`` and ``--threads`` >= 1, ``--device``
    available (``ValueError`` naming it)."""
    if args.max_aspect is not None and not args.max_aspect >= 1:
        raise ValueError(f"--max-aspect {args.max_aspect}: must be a number >= 1")
    for flag, value in (("--heads", args.heads), ("--kv-heads", args.kv_heads),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    from .diagnostics.batched import check_device

    check_device(args.device)  # --device cuda without CUDA: a usage error (exit 2)


def _ww_options(args: argparse.Namespace) -> dict:
    """WeightWatcher's optional diagnostics asked for on the command line (only those that
    differ from ``analyze``'s defaults, so resume folders of plain scans keep matching)."""
    opts = {"mp_fit": args.mp_fit, "fit": args.fit, "fix_fingers": args.fix_fingers,
            "max_evals": args.max_evals, "min_evals": args.min_evals}
    defaults = {"mp_fit": False, "fit": "PL", "fix_fingers": None, "max_evals": None,
                "min_evals": 8}
    out = {k: v for k, v in opts.items() if v != defaults[k]}
    if args.randomize is not None:  # --randomize [SEED]: an int seed (0 by default)
        out["randomize"] = args.randomize
    return out


def _gram_dtype(args: argparse.Namespace):
    """``--gram-dtype``: ``None`` (float64, the default) or ``torch.float32``."""
    import torch

    return torch.float32 if getattr(args, "gram_dtype", "float64") == "float32" else None


def _run_analyze(args: argparse.Namespace, model, out: Path | None):
    """``(exit code, dataset or None)``: file errors exit 3, NaN/Inf tensors 5, a resume
    folder or base of other settings 2, nothing analysable 4 (one line each)."""
    import shutil

    from ._io import UnreadableFileError
    from .diagnostics.analyze import analyze
    from .diagnostics.checkpoint_files import CheckpointMismatchError, NonFiniteTensorError
    from .diagnostics.lazy_view import HeadsMismatchError
    from .diagnostics.scan import ResumeMismatchError

    resume = out / "analyze_resume" if out is not None and not args.example else None
    if resume is not None and args.no_resume and resume.is_dir():
        shutil.rmtree(resume)
    try:
        return 0, analyze(model, layers=args.layers, conv=args.conv, return_esd=bool(out),
                          base=args.base, max_aspect=args.max_aspect, heads=args.heads,
                          per_head=args.per_head, kv_heads=args.kv_heads,
                          resume=resume, threads=args.threads, strict=args.strict,
                          device=args.device, gram_dtype=_gram_dtype(args),
                          **_ww_options(args))
    except UnreadableFileError as err:
        return _fail(err, EXIT_BAD_FILE), None
    except NonFiniteTensorError as err:
        return _fail(err, EXIT_NON_FINITE), None
    except (ResumeMismatchError, CheckpointMismatchError, HeadsMismatchError) as err:
        return _fail(err, EXIT_USAGE), None
    except ValueError as err:
        return _fail(err, EXIT_NO_LAYERS), None


def _print_and_write_analysis(ds, out: Path | None, source: str = "",
                              esd_layers: str | None = None) -> None:
    """Print the table; with ``out``, write the report folder
    (:func:`bayes_spectral.apps.analyze_report.write_analysis_report`)."""
    import pandas as pd

    columns = _TABLE_COLUMNS + [c for c in _OPTION_COLUMNS if c in ds.data_vars]
    table = ds.drop_vars(["esd"], errors="ignore").to_dataframe()[columns]
    with pd.option_context("display.width", 250, "display.max_columns", 30,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string())
    if out is None:
        return
    from .apps.analyze_report import write_analysis_report

    written = write_analysis_report(ds, table, out, str(source), esd_layers)
    print(f"wrote {', '.join(p.name for p in written)} in {out}")


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
    preset = getattr(args, "config", None)
    if preset is not None and not callable(getattr(module.Config, preset, None)):
        presets = sorted(k for k, v in vars(module.Config).items() if isinstance(v, classmethod))
        return _fail(f"--config {preset!r}: {args.name} has the presets {presets}", EXIT_USAGE)
    config = (getattr(module.Config, preset)() if preset else
              module.Config.small() if args.small else module.Config())
    if args.seed is not None:
        config.seeds = (args.seed,)
    kind = preset or ("small" if args.small else "full")
    print(f"reproduce {args.name} ({kind} config): {config}")
    table = module.run(config, out_dir=args.out)
    if args.out:
        from .models._common import write_config

        write_config(args.out, args.name, config)
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.max_rows", 200, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    if args.out:
        print(f"wrote {args.out}/{args.name}.csv and {args.name}.png (claim summary: "
              f"{args.name}_summary.json; settings: {args.name}_config.json)")
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    from .apps.claims import load_summaries, render_claims

    try:
        if args.out:
            check_out = Path(args.out).parent
            if not check_out.is_dir():
                raise ValueError(f"--out: folder {check_out} does not exist")
        table = render_claims(load_summaries(args.source), detail=args.detail)
    except ValueError as err:
        return _fail(err, EXIT_USAGE)
    print(table, end="")
    if args.out:
        from ._io import write_text_atomic

        write_text_atomic(args.out, table)
        print(f"wrote {args.out}")
    return 0


def _config_from_args(args: argparse.Namespace):
    from .apps.compare import CompareConfig

    cfg = CompareConfig.quick() if args.quick else CompareConfig()
    for key in ("dataset", "epochs", "svi_epochs", "batch_size", "lr", "device",
                "temperature", "sampler_epochs", "sampler_lr", "num_chains", "cycles"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    if getattr(args, "sampler_batch_size", None) is not None:  # "full" or an integer
        with contextlib.suppress(ValueError):  # anything else: validate() names it, exit 2
            cfg.sampler_batch_size = args.sampler_batch_size
            cfg.sampler_batch_size = int(args.sampler_batch_size)
    if getattr(args, "methods", None) is not None:
        cfg.methods = tuple(args.methods)
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
                  warmup_steps=args.num_samples, num_chains=args.chains,
                  **({"temperature": args.temperature} if args.method in ("sgld", "sghmc")
                     else {}))
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
    src.add_argument("path", nargs="?", help="checkpoint: .safetensors file or sharded "
                     "folder (with or without model.safetensors.index.json), .bin/.pt/.pth "
                     "state dict (weights_only loading), or a LoRA adapter folder")
    src.add_argument("--example", choices=["digits-mlp"], help="train and analyse an "
                     "embedded example model instead of a file")
    p.add_argument("--layers", default=None, help="regular expression selecting layer names")
    p.add_argument("--conv", choices=["pool", "flatten"], default="pool",
                   help="conv kernels: pool the k*k slices' ESDs (default) or flatten")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default=None, help="report folder: analysis.csv, analysis.nc, "
                   "plots, report.html; also keeps finished rows (analyze_resume/) so an "
                   "interrupted scan resumes")
    p.add_argument("--no-resume", dest="no_resume", action="store_true",
                   help="recompute every row (clear OUT/analyze_resume first)")
    p.add_argument("--base", default=None, help="base checkpoint: analyse W - W_base")
    p.add_argument("--max-aspect", dest="max_aspect", type=float, default=None,
                   help="leave out matrices with max(shape)/min(shape) above this")
    p.add_argument("--heads", type=int, default=None, help="attention heads (to split "
                   "query_key_value; read from config.json when there)")
    p.add_argument("--per-head", dest="per_head", action="store_true", help="one row per "
                   "attention head of every Q, K, V matrix (fused or separate projections)")
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=None, help="key/value "
                   "heads of grouped-query attention for --per-head (read from config.json "
                   "when there)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                   "the cores not busy with other work)")
    p.add_argument("--device", default="cpu", help="where the Gram matrices and eigvalsh "
                   "run: cpu (default) or cuda (eigenvalues back in float64 on the CPU)")
    p.add_argument("--gram-dtype", dest="gram_dtype", choices=["float64", "float32"],
                   default="float64", help="form the Gram matrices in float32 (faster; "
                   "eigvalsh still float64; tail metrics within ~1e-6, tiny eigenvalues less "
                   "accurate) or float64 (default)")
    p.add_argument("--strict", action="store_true", help="a tensor holding NaN/Inf stops "
                   "the scan (exit 5, naming file and tensor) instead of being left out")
    p.add_argument("--mp-fit", dest="mp_fit", action="store_true", help="Marchenko-Pastur "
                   "bulk fit: sigma_mp, num_spikes, bulk_min/max, mp_softrank")
    p.add_argument("--randomize", nargs="?", const=0, type=int, default=None, metavar="SEED",
                   help="ESD of the element-permuted weight: rand_distance, ww_softrank, "
                   "num_traps (correlation traps); optional seed (default 0)")
    p.add_argument("--fit", choices=["PL", "TPL", "E_TPL"], default="PL", help="tail law: "
                   "power law, truncated power law (Lambda column), TPL from the ESD peak")
    p.add_argument("--fix-fingers", dest="fix_fingers", choices=["xmin_peak", "clip_xmax"],
                   default=None, help="WeightWatcher's fix_fingers rule")
    p.add_argument("--min-evals", dest="min_evals", type=int, default=8,
                   help="leave out matrices with fewer eigenvalues (default 8)")
    p.add_argument("--max-evals", dest="max_evals", type=int, default=None,
                   help="leave out matrices with more eigenvalues (default: no limit)")
    p.add_argument("--esd-layers", dest="esd_layers", default=None, help="regular "
                   "expression: layers whose ESD and fit are plotted (default: first, "
                   "middle, last)")
    p.set_defaults(func=cmd_analyze)


def _add_compare_parser(sub) -> None:
    from .apps.settings import PRIOR_METHODS
    from .data import DATASETS
    from .distributions import PRIORS
    from .penalties import PENALTIES

    c = sub.add_parser(
        "compare",
        help="the main job: every baseline penalty and spectral prior (MAP, SVI, SG-MCMC) "
             "on one MLP",
        description="Train one MLP with every baseline penalty (none, weight decay, spectral "
                    "norm, stable rank, weighted alpha) and every spectral prior (MAP, then SVI "
                    "and SGHMC from the MAP fit) over seeds; print a results table (held-out "
                    "log predictive density +- SE, PSIS-LOO with k-hat) and write a report "
                    "folder (results.csv, summary.csv, plots, report.html).",
        epilog="examples:\n  bayes-spectral compare\n  bayes-spectral compare --quick --out r/"
               "\n  bayes-spectral compare --priors powerlaw --baselines none weight_decay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--quick", action="store_true",
                   help="about a minute: smaller MLP, 2 seeds, 2 short SGHMC chains")
    c.add_argument("--dataset", choices=DATASETS.names(), default=None)
    c.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    c.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths")
    c.add_argument("--epochs", type=int, default=None)
    c.add_argument("--svi-epochs", dest="svi_epochs", type=int, default=None)
    c.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    c.add_argument("--lr", type=float, default=None)
    c.add_argument("--baselines", nargs="*", default=None, choices=PENALTIES.names())
    c.add_argument("--priors", nargs="*", default=None, choices=PRIORS.names())
    c.add_argument("--no-svi", dest="no_svi", action="store_true", help="no SVI rows")
    c.add_argument("--methods", nargs="+", default=None, choices=PRIOR_METHODS,
                   help="inference per prior (default map svi sghmc; map always runs)")
    c.add_argument("--temperature", type=float, default=None,
                   help="SG-MCMC temperature (default 1: the Bayes posterior; < 1 cold)")
    c.add_argument("--sampler-epochs", dest="sampler_epochs", type=int, default=None)
    c.add_argument("--sampler-lr", dest="sampler_lr", type=float, default=None,
                   help="SG-MCMC lr (step size lr / N)")
    c.add_argument("--sampler-batch-size", dest="sampler_batch_size", default=None,
                   help="SG-MCMC batch size, or 'full' (default: every training point; "
                        "mini-batch noise widens the draws)")
    c.add_argument("--chains", dest="num_chains", type=int, default=None,
                   help="SG-MCMC chains per seed (default 4; --quick 2)")
    c.add_argument("--cycles", type=int, default=None, help="cyclical step-size cycles")
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
        help="fit one Bayesian MLP (prior, method map/svi/nuts/sgld/sghmc) with checkpoints "
             "and --resume",
        epilog="examples:\n  bayes-spectral fit --prior powerlaw --method map --out run1/\n"
               "  bayes-spectral fit --prior gaussian --method nuts --hidden 8 --out n1/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--prior", choices=PRIORS.names(), default="powerlaw")
    f.add_argument("--method", choices=["map", "svi", "nuts", "sgld", "sghmc"], default="map")
    f.add_argument("--dataset", choices=DATASETS.names(), default="digits")
    f.add_argument("--hidden", type=int, nargs="+", default=[64])
    f.add_argument("--epochs", type=int, default=20)
    f.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    f.add_argument("--lr", type=float, default=3e-3)
    f.add_argument("--num-samples", dest="num_samples", type=int, default=200,
                   help="NUTS: draws (and warm-up steps) per chain")
    f.add_argument("--chains", type=int, default=2, help="NUTS / SG-MCMC chains")
    f.add_argument("--temperature", type=float, default=1.0,
                   help="sgld/sghmc: sample exp(-U/T) (1 = the Bayes posterior, < 1 cold)")
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
    r.add_argument("--out", default=None, help="folder for the CSV table, PNG plot and "
                   "NAME_summary.json (the claim summary `bayes-spectral claims` reads)")
    r.add_argument("--config", default=None, metavar="PRESET",
                   help="a Config preset of the model instead of the default, e.g. "
                        "'paper' or 'paper_small' for heavy_tailed")
    r.set_defaults(func=cmd_reproduce)


def _add_claims_parser(sub) -> None:
    c = sub.add_parser(
        "claims", help="render the papers' claims table from reproduce summaries",
        description="Markdown claims table (one line per paper: seeds, paired difference "
                    "vs the paper's baseline with its 95%% interval and p, verdict, what "
                    "would change it) from every *_summary.json under --from.",
        epilog="example:\n  bayes-spectral reproduce heavy_tailed --config paper --out out/\n"
               "  bayes-spectral claims --from out/ --out out/claims.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="folder searched (recursively) for NAME_summary.json files")
    c.add_argument("--detail", action="store_true", help="also every comparison row")
    c.add_argument("--out", default=None, help="also write the table to this file")
    c.set_defaults(func=cmd_claims)


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
    _add_claims_parser(sub)
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
