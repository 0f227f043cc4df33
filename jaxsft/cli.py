"""The `jaxsft` command: parse arguments, call one function per command.

    jaxsft train CONFIG.yaml [section.key=value ...]
    jaxsft export RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import sys

from jaxsft.errors import JaxsftError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsft", description="Supervised fine-tuning of Hugging Face models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune (or resume) the run a config describes")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    e = sub.add_parser("export", help="write a Hugging Face model directory from a run or checkpoint")
    e.add_argument("source", help="run directory (newest checkpoint) or one checkpoint directory")
    e.add_argument("out", help="output directory (must not exist or be empty)")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; expected mistakes print one message and exit 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from jaxsft.config import load_config
            from jaxsft.train import train

            train(load_config(args.config, args.overrides))
        elif args.command == "export":
            from jaxsft.export import export

            out = export(args.source, args.out, dtype=args.dtype)
            print(f"exported {out}")
    except JaxsftError as e:
        print(f"jaxsft {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
