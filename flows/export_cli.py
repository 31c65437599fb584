"""CLI plugin: `racm3 export` (a trained checkpoint to safetensors + config.json for plain PyTorch)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flows.cli import data_root_arg

    p = sub.add_parser("export", help="a trained checkpoint (train/<variant>.pt) to "
                       "model.safetensors + config.json, loadable with plain PyTorch")
    data_root_arg(p)
    p.add_argument("--variant", default="ra-cm3", help="checkpoint train/<variant>.pt")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    import pickle

    from pipelines.core.config import ConfigError
    from pipelines.export import export_model
    from storage.fs import DataRoot

    try:
        export_model(DataRoot(args.data_root), args.variant, args.out)
    except FileExistsError as e:
        raise ConfigError("--out", str(e)) from e
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:  # a damaged or foreign .pt
        raise ConfigError("--variant", f"train/{args.variant}.pt cannot be exported: {e}") from e
    print(f"exported train/{args.variant}.pt to {args.out}")
    return 0
