"""Generated tokens per second: jaxsft's KV-cache decoding against Hugging Face `generate`.

    python tools/bench_generate.py [--model runs/tiny-llama] [--batch 8] [--new-tokens 64] [--repeats 5]

runs/tiny-llama is `python tools/make_tiny_model.py runs/tiny-llama --data configs/demo_data/train.jsonl
--split-digits` (3.4M random parameters).

Both decode the same batch of held-out demo prompts greedily, on this machine's CPU, in float32,
with stopping turned off so that every row produces exactly `--new-tokens` tokens. jaxsft's time is
the median of `--repeats` calls after a first call that compiles (its compile time is shown on its
own); Hugging Face's is the median of `--repeats` calls of `model.generate` (PyTorch, eager, its
default thread count). The last column checks that both produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from jaxsft.config import GenerateConfig  # noqa: E402
from jaxsft.generate import decode, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    """Runs both, prints the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "tiny-llama"), help="Hugging Face model directory")
    ap.add_argument("--data", default=str(ROOT / "configs" / "demo_data" / "eval.jsonl"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    loaded = load_model(a.model)
    records = [json.loads(x) for x in Path(a.data).read_text().splitlines()[:a.batch]]
    prompts = [loaded.prompt(r["prompt"]) for r in records]
    cfg = GenerateConfig(max_new_tokens=a.new_tokens, batch_size=a.batch)
    run = lambda: decode(loaded.model, prompts, cfg, stop_ids=())  # noqa: E731 - no stops: every row runs to the end
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    ours_s, ours = timed(run, a.repeats)

    hf = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded, as generate expects
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def hf_run():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=pad)

    hf.generation_config.eos_token_id = None
    hf_run()  # warm-up
    hf_s, hf_out = timed(hf_run, a.repeats)
    same = sum(o == h[width:].tolist() for o, h in zip(ours, hf_out))

    tokens = a.batch * a.new_tokens
    print(f"model {a.model} ({sum(x.size for x in jax.tree.leaves(loaded.model)):,} parameters), float32, greedy; "
          f"batch {a.batch}, prompts of {min(map(len, prompts))}-{width} tokens, {a.new_tokens} new tokens each")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print()
    print("| implementation | time per batch | generated tokens/s | same tokens as HF |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| jaxsft generate (prefill + lax.while_loop, KV cache) | {ours_s * 1000:.0f} ms | {tokens / ours_s:,.0f} | "
          f"{same}/{a.batch} rows |")
    print(f"| Hugging Face generate (PyTorch, KV cache) | {hf_s * 1000:.0f} ms | {tokens / hf_s:,.0f} | - |")
    print(f"\njaxsft's first call (compiling) took {first:.1f} s; speed-up after it: {hf_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
