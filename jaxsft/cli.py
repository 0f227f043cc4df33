"""The `jaxsft` command: parse arguments, call one function per command.

    jaxsft train CONFIG.yaml [section.key=value ...] [--dry-run] [--force-resume]
    jaxsft plot RUN_DIR
    jaxsft export RUN_DIR_OR_CHECKPOINT_OR_HF_DIR OUT_DIR [--dtype float32|bfloat16] [--max-shard-size 5GB] [--adapter]
    jaxsft import-gguf FILE.gguf OUT_DIR [--dtype float32|bfloat16]
    jaxsft data inspect CONFIG.yaml [section.key=value ...] [-n N] [--json N]
    jaxsft compile CONFIG.yaml --topology v5p-8 [section.key=value ...]
    jaxsft generate MODEL (--prompt TEXT | --file PROMPTS.jsonl) [--system TEXT] [key=value ...]
    jaxsft eval CONFIG.yaml --model MODEL [--baseline MODEL] [--few-shot K] [--out DIR] [section.key=value ...]
    jaxsft curve CONFIG.yaml --sizes 100,300,1000 [--metric NAME] [--few-shot K] [--epochs E] [--out DIR]
                 [section.key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from jaxsft.errors import Interrupted, JaxsftError


def _out_and_dtype(command: argparse.ArgumentParser) -> None:
    """The OUT directory and --dtype of the commands that write a Hugging Face directory."""
    from jaxsft.hfwrite import DTYPES

    command.add_argument("out", help="output directory (must not exist or be empty)")
    command.add_argument("--dtype", choices=tuple(DTYPES), default="float32")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsft", description="Supervised fine-tuning of Hugging Face models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    # One add_parser / add_argument call per command and option: runs of them share a shape (the
    # `duplicates` tool pairs export's with train's) but each states its own option; the two that
    # are the same for several commands are `_out_and_dtype`.
    t = sub.add_parser("train", help="fine-tune (or resume) the run a config describes")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parameters, mesh, shardings and memory; train nothing")
    t.add_argument("--force-resume", action="store_true",
                   help="resume even though data, model.path, data.seq_len or train.batch_size changed (the "
                        "change is recorded in RUN_DIR/config_history.yaml)")
    pl = sub.add_parser("plot", help="draw RUN_DIR/metrics.png: loss, eval loss, learning rate, tokens/s")
    pl.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    e = sub.add_parser("export", help="write a Hugging Face model directory from a run or checkpoint")
    e.add_argument("source", help="run directory (newest checkpoint), one checkpoint directory, or a Hugging Face "
                                   "directory (copied in --dtype)")
    _out_and_dtype(e)
    e.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file, e.g. 5GB (default), 500MB, 2GiB; above it, shards plus an index")
    e.add_argument("--adapter", action="store_true",
                   help="a LoRA run: write its PEFT adapter directory (adapter_config.json, adapter_model.safetensors) "
                        "instead of merged weights")
    ig = sub.add_parser("import-gguf", help="write a Hugging Face model directory from a GGUF file (dequantized)")
    ig.add_argument("gguf", help="GGUF file (needs the gguf package: pip install \"jaxsft[gguf]\")")
    _out_and_dtype(ig)
    c = sub.add_parser("compile", help="compile the train step for a TPU topology from this host: fits? how fast?")
    c.add_argument("config", help="YAML config file (model.path needs only config.json)")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides")
    c.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-8, v5e-16, v6e-8, v4-8 (or v5e:2x4)")
    g = sub.add_parser("generate", help="complete prompts with a model (chat template applied as in training)")
    g.add_argument("model", help="Hugging Face directory, run directory or checkpoint directory")
    g.add_argument("overrides", nargs="*", help="decoding settings: max_new_tokens=, temperature=, top_k=, top_p=, "
                                                "seed=, stop=[...], batch_size=")
    g.add_argument("--prompt", help="one prompt (the user message); its completion is printed")
    g.add_argument("--file", help="JSONL of {prompt, system?} or {messages} records; prints one JSON line per record")
    g.add_argument("--system", help="system prompt for --prompt, and for --file records that have none")
    v = sub.add_parser("eval", help="held-out loss and generation metrics, optionally against a baseline")
    v.add_argument("config", help="YAML config file (data.eval, eval.*)")
    v.add_argument("overrides", nargs="*", help="section.key=value overrides")
    v.add_argument("--model", required=True, help="Hugging Face directory, run directory or checkpoint directory")
    v.add_argument("--baseline", help="a second model to compare with on the same prompts (e.g. the base model)")
    v.add_argument("--out", help="directory for the report (default: the model's run directory, else run.dir)")
    few_shot = ("also prompt the base model (--baseline, else --model) with K examples of data.train before each "
                "held-out prompt (eval.few_shot)")
    v.add_argument("--few-shot", type=int, metavar="K", help=few_shot)
    cu = sub.add_parser("curve", help="learning curve: train on nested subsets of data.train, evaluate each, plot")
    cu.add_argument("config", help="YAML config file (data.train, data.eval, train.*, eval.*)")
    cu.add_argument("overrides", nargs="*", help="section.key=value overrides")
    cu.add_argument("--sizes", required=True, help="training examples per point, comma-separated, e.g. 100,300,1000")
    cu.add_argument("--metric", help="what curve.png plots: one of the eval metrics (default: the first) or loss")
    cu.add_argument("--few-shot", type=int, metavar="K", help="the base model's K-shot baseline too (eval.few_shot)")
    cu.add_argument("--epochs", type=float, metavar="E",
                    help="train each size for E epochs: ceil(E x packed rows of the subset / train.batch_size) steps "
                         "(default: train.steps for every size)")
    cu.add_argument("--out", help="output directory (default: run.dir followed by -curve)")
    d = sub.add_parser("data", help="look at what the data stage makes of a config's data")
    d_sub = d.add_subparsers(dest="data_command", required=True)
    i = d_sub.add_parser("inspect", help="statistics and examples with their trained tokens highlighted")
    i.add_argument("config", help="YAML config file")
    i.add_argument("overrides", nargs="*", help="section.key=value overrides")
    i.add_argument("-n", "--examples", type=int, default=3, help="examples to show (default 3)")
    i.add_argument("--json", type=int, metavar="N", help="print the first N unpacked examples as JSON lines instead")
    return p


_RUNS_STEPS = ("train", "eval", "curve", "generate")  # commands that execute compiled steps


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; expected mistakes print one message and exit 2."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`--topology v5p-8 train.batch_size=16`).
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from jaxsft.platforms import name_host_platforms

    name_host_platforms()  # before jax is imported: no libtpu errors on a host without a TPU
    if args.command in _RUNS_STEPS:
        from jaxsft.hostmem import cpu_backend_expected, keep_freed_memory

        if cpu_backend_expected():
            keep_freed_memory()  # before any thread allocates; see hostmem.py
    try:
        if args.command == "train":
            from jaxsft.config import load_config
            from jaxsft.parallel import initialize_distributed
            from jaxsft.train import train

            cfg = load_config(args.config, args.overrides)
            if args.dry_run:
                from jaxsft.aot import dry_run

                print("\n".join(dry_run(cfg)))
                return 0
            initialize_distributed()  # a multi-process job joins before anything touches the devices
            # After SIGTERM, train saves the current step and returns normally: exit 0, resumable.
            # After Ctrl-C it saves too, then raises Interrupted: exit 130.
            train(cfg, force_resume=args.force_resume)
        elif args.command == "export":
            from jaxsft.export import export

            out = export(args.source, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         adapter=args.adapter)
            print(f"exported {out}")
        elif args.command == "import-gguf":
            from jaxsft.gguf import import_gguf

            print(f"imported {import_gguf(args.gguf, args.out, dtype=args.dtype)}")
        elif args.command == "plot":
            from jaxsft.plot import plot_run

            print(f"wrote {plot_run(args.run_dir)}")
        elif args.command == "compile":
            return _compile(args)
        elif args.command == "generate":
            from jaxsft.config import generate_config
            from jaxsft.generate import generate_main

            generate_main(args.model, args.prompt, args.file, generate_config(args.overrides), system=args.system)
        elif args.command == "eval":
            from jaxsft.config import load_config
            from jaxsft.evaluate import markdown, run_eval

            cfg = load_config(args.config, _few_shot_overrides(args))
            print(markdown(run_eval(cfg, args.model, args.baseline, args.out)))
        elif args.command == "curve":
            from jaxsft.config import load_config
            from jaxsft.curve import markdown, parse_sizes, run_curve

            sizes = parse_sizes(args.sizes)
            cfg = load_config(args.config, _few_shot_overrides(args))
            print(markdown(run_curve(cfg, sizes, out=args.out, metric=args.metric, epochs=args.epochs)))
        elif args.command == "data":
            from jaxsft.config import load_config
            from jaxsft.data.inspect import dump_json, inspect_data

            cfg = load_config(args.config, args.overrides)
            if args.json is not None:
                dump_json(cfg, args.json)
            else:
                inspect_data(cfg, examples=args.examples)
    except JaxsftError as e:
        print(f"jaxsft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGINT or SIGTERM; the message says what was saved
        print(f"jaxsft {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before a command took the signal over
        print(f"jaxsft {args.command}: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only file system: name the file, no traceback
        if e.filename is None:
            raise
        print(f"jaxsft {args.command}: error: cannot write or read {e.filename}: {e.strerror or e}; nothing "
              f"already written was changed (files are replaced whole)", file=sys.stderr)
        return 2
    return 0


def _few_shot_overrides(args) -> list[str]:
    """The config overrides with `--few-shot K` as `eval.few_shot=K` (it wins over the others)."""
    return list(args.overrides) + ([f"eval.few_shot={args.few_shot}"] if args.few_shot is not None else [])


def _compile(args) -> int:
    import os

    # libtpu looks for a TPU at import unless told this host has none; the CPU backend is enough.
    if not os.environ.get("JAX_PLATFORMS", "").strip():  # unset or empty
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jaxsft.aot import compile_report
    from jaxsft.config import load_config

    lines, fits = compile_report(load_config(args.config, args.overrides), args.topology)
    print("\n".join(lines))
    return 0 if fits else 3


if __name__ == "__main__":
    sys.exit(main())
