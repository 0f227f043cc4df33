#!/usr/bin/env python3
"""Training speed: jaxsft versus Hugging Face TRL on the same model, data and machine, in one run.

The shape is the one `../shared/peers/trl_sft_bench.py` and `../shared/peers/maxtext.md` use: a
Llama-architecture model of ~34M parameters (8 layers, width 512, GQA 8/4, MLP 2048, vocab 2048),
sequence length 512, batch 8, float32, packed rows, completion-only loss, on the demo's data.

    .venv/bin/python tools/bench_train.py [--steps 13] [--rounds 1] [--skip-trl]
    .venv/bin/python tools/bench_train.py --lora [--rank 16]   # + jaxsft LoRA vs TRL with a peft LoRA adapter

With `--lora` each round runs jaxsft's full fine-tuning, jaxsft LoRA (rank `--rank`, alpha 2x rank,
all seven projections, no dropout) and TRL + peft with the same adapter (tools/peers/trl_peft_bench.py,
the shared TRL script plus `peft_config`); the ratio column is then against TRL + peft.

Both tools train for `--steps` steps; the first 3 are warm-up (compilation) and are not counted.
tokens/s is packed positions per second (batch x seq / median step time), as the TRL script
prints it. MFU counts 6N + 12LHT FLOPs per position (jaxsft.flops) against a measured float32
matmul peak of this CPU (the best over a few seconds before and after the runs). Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
DEFAULT_TRL = ROOT.parent / "shared" / "peers" / "trl_sft_bench.py"
SHAPE = dict(vocab_size=2048, hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8, num_kv_heads=4)


def build_model(out: Path, data: Path) -> Path:
    """The benchmark model (random weights, tokenizer trained on the data), built once and reused."""
    if (out / "config.json").is_file():
        return out
    from make_tiny_model import build_tiny_llama, read_jsonl_texts

    build_tiny_llama(str(out), read_jsonl_texts(str(data)), **SHAPE)
    return out


def run_jaxsft(model: Path, data: Path, run_dir: Path, steps: int, batch: int, seq: int, remat: str,
               extra: tuple[str, ...] = ()) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "jaxsft.cli", "train", str(ROOT / "configs" / "demo.yaml"), f"model.path={model}",
           f"data.train=[{data}]", "data.eval=[]", f"data.seq_len={seq}", f"train.batch_size={batch}",
           f"train.steps={steps}", "train.log_every=1", "mesh.fsdp=1", f"model.remat={remat}",
           "optimizer.lr=1e-4", "optimizer.warmup_steps=0", "checkpoint.every=100000",
           f"run.dir={run_dir}", "run.export=", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in lines if "step_s" in x and x["step"] > 3]
    step_s = statistics.median(x["step_s"] for x in timed)
    return {"tokens_per_s": batch * seq / step_s, "step_s": step_s,
            "mfu": statistics.median(x["mfu"] for x in timed) if "mfu" in timed[0] else None,
            "loss": (lines[0]["loss"], lines[-1]["loss"])}


def run_trl(script: Path, python: str, model: Path, data: Path, steps: int, batch: int, seq: int,
            extra: tuple[str, ...] = ()) -> dict:
    out = subprocess.run([python, str(script), str(model), str(data), "--steps", str(steps), "--batch", str(batch),
                          "--seq", str(seq), *extra], check=True, capture_output=True, text=True)
    m = re.search(r"trl tokens_per_s=([\d.]+) step_s=([\d.]+)", out.stdout)
    if not m:
        raise RuntimeError(f"unexpected TRL output:\n{out.stdout}\n{out.stderr[-2000:]}")
    return {"tokens_per_s": float(m.group(1)), "step_s": float(m.group(2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--data", type=Path, default=ROOT / "configs" / "demo_data" / "train.jsonl")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "bench-model")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--trl-script", type=Path, default=DEFAULT_TRL)
    ap.add_argument("--trl-python", default=sys.executable, help="a Python with torch and trl (default: this one)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="run both tools this many times, alternating; "
                    "the table shows each tool's median run")
    ap.add_argument("--lora", action="store_true", help="also jaxsft LoRA, against TRL + peft LoRA")
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    lora_jaxsft = ("lora.rank=%d" % a.rank, "lora.alpha=%d" % (2 * a.rank), "lora.base_dtype=float32")
    lora_trl = ("--rank", str(a.rank), "--alpha", str(2 * a.rank))
    if a.lora and a.trl_script == DEFAULT_TRL:
        a.trl_script = ROOT / "tools" / "peers" / "trl_peft_bench.py"

    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from flax import nnx

    from jaxsft import flops
    from jaxsft.models import abstract_model, args_from_hf_config, read_hf_config

    model = build_model(a.model_dir, a.data)
    args = args_from_hf_config(read_hf_config(model))
    params = nnx.to_pure_dict(nnx.split(abstract_model(args))[1])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    flops_per_pos = flops.train_flops_per_position(params, args, a.seq)
    peak = flops.measured_cpu_peak_flops(seconds=3.0)

    if not a.skip_trl and not a.trl_script.is_file():
        sys.exit(f"bench_train: TRL peer script not found at {a.trl_script} (pass --trl-script or --skip-trl)")
    # Rounds alternate the tools, so that a slow spell of a shared machine does not land on one alone.
    ours_runs, lora_runs, trl_runs = [], [], []
    t = time.time()
    for _ in range(a.rounds):
        ours_runs.append(run_jaxsft(model, a.data, ROOT / "runs" / "bench-jaxsft", a.steps, a.batch, a.seq, a.remat))
        if a.lora:
            lora_runs.append(run_jaxsft(model, a.data, ROOT / "runs" / "bench-jaxsft-lora", a.steps, a.batch, a.seq,
                                        a.remat, lora_jaxsft))
        if not a.skip_trl:
            trl_runs.append(run_trl(a.trl_script, a.trl_python, model, a.data, a.steps, a.batch, a.seq,
                                    lora_trl if a.lora else ()))
    wall = time.time() - t

    def median_run(runs):
        best = statistics.median_low(r["tokens_per_s"] for r in runs)
        return next(r for r in runs if r["tokens_per_s"] == best)

    ours = median_run(ours_runs)
    rows = [("jaxsft" + (" full fine-tuning" if a.lora else ""), ours)]
    if lora_runs:
        rows.append((f"jaxsft LoRA r{a.rank}", median_run(lora_runs)))
    if trl_runs:
        rows.append(("Hugging Face TRL" + (f" + peft LoRA r{a.rank}" if a.lora else ""), median_run(trl_runs)))
    # FLOPs of a LoRA step (jaxsft.flops): the frozen kernels 4N (no weight gradients), the adapters 6N.
    lora_flops = None
    if a.lora:
        from jaxsft import lora
        from jaxsft.config import LoraConfig

        lora_args = lora.model_args(args, LoraConfig(rank=a.rank, alpha=2.0 * a.rank))
        adapters = lora.adapters_of(nnx.to_pure_dict(nnx.split(abstract_model(lora_args))[1]))
        lora_flops = flops.train_flops_per_position(adapters, args, a.seq, frozen=params)

    peak = max(peak, flops.measured_cpu_peak_flops(seconds=3.0))  # before and after: the best of both
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, measured float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"model: {n_params / 1e6:.1f}M parameters ({args.num_layers} layers, width {args.hidden_size}, "
          f"heads {args.num_heads}/{args.num_kv_heads}, vocab {args.vocab_size}); batch {a.batch} x seq {a.seq}, "
          f"float32, packed, completion-only; {a.steps} steps, first 3 not timed; jaxsft remat={a.remat}")
    print(f"jaxsft loss {ours['loss'][0]:.3f} -> {ours['loss'][1]:.3f} over {a.steps} steps; {a.rounds} round(s), "
          f"{wall:.0f} s wall")
    if trl_runs and a.rounds > 1:
        compared = lora_runs or ours_runs
        print(f"per round jaxsft{' LoRA' if a.lora else ''}/TRL: " + ", ".join(
            f"{o['tokens_per_s']:,.0f}/{r['tokens_per_s']:,.0f} = {o['tokens_per_s'] / r['tokens_per_s']:.2f}x"
            for o, r in zip(compared, trl_runs)))
    if lora_runs:
        r = median_run(lora_runs)
        print(f"jaxsft LoRA loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}; LoRA step / full step "
              f"{r['step_s'] / ours['step_s']:.2f}; MFU of LoRA counts 4N (frozen) + 6N (adapters) + 12LHT")
    print()
    print("| tool | tokens/s | step (s) | MFU | vs TRL |")
    print("|---|---:|---:|---:|---:|")
    trl_tps = rows[-1][1]["tokens_per_s"] if trl_runs else None
    for name, r in rows:
        mfu = r["tokens_per_s"] * (lora_flops if "LoRA" in name else flops_per_pos) / peak
        ratio = f"{r['tokens_per_s'] / trl_tps:.2f}x" if trl_tps else "-"
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {100 * mfu:.1f}% | {ratio} |")


if __name__ == "__main__":
    main()
