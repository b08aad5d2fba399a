"""Layer 6: the ``bayes-spectral`` command.

Exit codes: 0 success, 2 usage error (argparse), 3 unreadable or unsafe input file,
4 the input had no analysable weight.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

EXIT_BAD_FILE = 3
EXIT_NO_LAYERS = 4

_EXAMPLES = """examples:
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
    if name != "digits-mlp":
        raise ValueError(f"unknown example {name!r}; available: digits-mlp")
    from .data import load_digits

    torch.manual_seed(seed)
    data = load_digits(seed=seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        perm = torch.randperm(len(data.x_train))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(data.x_test).argmax(-1) == data.y_test).float().mean()
    print(f"example digits-mlp: 64-256-128-10 MLP, Adam 30 epochs, test accuracy {acc:.3f}")
    return model


def cmd_analyze(args: argparse.Namespace) -> int:
    import pandas as pd

    from .diagnostics import analyze

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
        ds = analyze(model, layers=args.layers, conv=args.conv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_LAYERS
    table = ds.to_dataframe()[_TABLE_COLUMNS]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "analysis.csv")
        print(f"wrote {out / 'analysis.csv'}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-spectral",
        description="Spectral diagnosis and spectral priors for PyTorch networks.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bayes-spectral`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
