"""Benchmark the data pipeline against Hugging Face TRL's dataset preparation, on the same file and tokenizer.

jaxsft: the whole path from a JSONL file to packed batches: read -> chat template -> tokenize ->
mask -> length policy (`prepare_train`, which also plans the epoch's packing for its report), then
one epoch of packed `[batch, seq_len]` batches from the Grain pipeline.
TRL: `SFTTrainer._prepare_dataset` with SFTConfig(packing=True, completion_only_loss=True,
max_length=seq_len), as in /work/shared/peers/trl_sft_bench.py, on the same file: from JSON loading
(`datasets.load_dataset("json")`, caching off) to its packed dataset. Once on the records as they
are (string prompt/completion: TRL does not apply the chat template to strings) and once on the same
records as message lists (conversational: the chat template applies, the same tokens jaxsft makes;
tests/test_data_trl.py checks that, token for token).

    python tools/bench_data.py [--model runs/tiny-llama] [--data configs/demo_data/train.jsonl]
                               [--records 20000] [--seq-len 512] [--repeats 3]

The demo data is repeated to `--records` records in a temporary directory. Each measurement is the
best of `--repeats` runs, interleaved with the others'. The model directory is built as tools/demo.sh
builds it when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_data(src: Path, n: int, out: Path) -> tuple[Path, Path]:
    """`n` records of `src` (repeated) as string prompt/completion, and the same as message lists."""
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    records = [json.loads(lines[i % len(lines)]) for i in range(n)]
    plain, conv = out / "train.jsonl", out / "train_conversational.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records))
    conv.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                        "completion": [{"role": "assistant", "content": r["completion"]}]}) + "\n"
                            for r in records))
    return plain, conv


def best_of(repeats: int, runs: dict) -> dict:
    """`{name: (seconds, result)}`: the fastest of `repeats` calls of each, the calls interleaved
    (A B C A B C ...) so that a busy moment of the machine does not favour one of them."""
    best: dict = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - t0
            if name not in best or elapsed < best[name][0]:
                best[name] = (elapsed, result)
    return best


def run_jaxsft(path: Path, tokenizer, seq_len: int, batch: int) -> dict:
    """The jaxsft pipeline over one epoch: counts, tokens and packing efficiency."""
    from jaxsft.config import DataConfig
    from jaxsft.data.pipeline import batches, prepare_train

    cfg = DataConfig(train=(str(path),), seq_len=seq_len)
    prepared = prepare_train(cfg, tokenizer, seed=0)
    it = iter(batches(prepared, cfg, seed=0, local_batch=batch))
    segments = tokens = rows = 0
    while segments < prepared.stats.kept:  # one epoch of examples, packed and batched
        b = next(it)
        segments += int(b["segment_ids"].max(axis=1).sum())
        tokens += int((b["segment_ids"] > 0).sum())
        rows += b["segment_ids"].shape[0]
    return {"records": prepared.stats.records, "tokens": prepared.stats.tokens, "efficiency": tokens / (rows * seq_len)}


def trl_setup(model_dir: Path, seq_len: int):
    """A built SFTTrainer (on a tiny dataset) whose `_prepare_dataset` the benchmark calls."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()  # every run really prepares the data
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=seq_len, packing=True, completion_only_loss=True,
                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    small = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])
    return SFTTrainer(model=model, args=args, train_dataset=small, processing_class=tokenizer), tokenizer, args


def run_trl(trainer, tokenizer, args, path: Path, seq_len: int) -> dict:
    """TRL's preparation of the JSONL file: records, tokens and packing efficiency of its packed rows."""
    from datasets import load_dataset

    raw = load_dataset("json", data_files=str(path), split="train")
    packed = trainer._prepare_dataset(raw, tokenizer, args, True, None, "train")
    tokens = sum(len(ids) for ids in packed["input_ids"])
    return {"records": len(raw), "tokens": tokens, "efficiency": tokens / (len(packed) * seq_len)}


def main(argv: list[str] | None = None) -> None:
    """Prints the table; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "tiny-llama"))
    p.add_argument("--data", default=str(ROOT / "configs" / "demo_data" / "train.jsonl"))
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    model_dir = Path(a.model)
    if not (model_dir / "model.safetensors").is_file():  # the tiny model of tools/make_tiny_model.py
        sys.path.insert(0, str(ROOT / "tools"))
        from make_tiny_model import build_tiny_llama, read_jsonl_texts

        model_dir = Path(build_tiny_llama(work / "tiny-llama", read_jsonl_texts(a.data), vocab_size=1024,
                                          hidden_size=256, intermediate_size=688, num_layers=4))
    plain, conv = write_data(Path(a.data), a.records, work)

    from jaxsft.data.render import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    trainer, trl_tok, args = trl_setup(model_dir, a.seq_len)
    best = best_of(a.repeats, {
        "jaxsft: read, template, tokenize, mask, pack, batch": lambda: run_jaxsft(plain, tokenizer, a.seq_len, a.batch),
        "TRL _prepare_dataset, message lists (same tokens)": lambda: run_trl(trainer, trl_tok, args, conv, a.seq_len),
        "TRL _prepare_dataset, strings (no chat template)": lambda: run_trl(trainer, trl_tok, args, plain, a.seq_len),
    })
    rows = [(name, *result) for name, result in best.items()]
    ours = rows[0][1]
    print(f"{a.records:,} records ({Path(a.data).name} repeated), seq_len {a.seq_len}, tokenizer {model_dir}, "
          f"{os.cpu_count()} CPUs, best of {a.repeats}")
    print(f"{'':52} {'seconds':>8} {'records/s':>10} {'tokens/s':>10} {'packing':>8} {'jaxsft is':>10}")
    for name, seconds, r in rows:
        speedup = "" if seconds is ours else f"{seconds / ours:.2f}x"
        print(f"{name:52} {seconds:8.2f} {r['records'] / seconds:10,.0f} {r['tokens'] / seconds:10,.0f} "
              f"{r['efficiency']:8.2%} {speedup:>10}")


if __name__ == "__main__":
    main()
