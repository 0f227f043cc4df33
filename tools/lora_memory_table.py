"""Per-chip HBM of Llama-3.1-8B training on one TPU chip: full fine-tuning vs LoRA vs QLoRA.

Compiles the real train step (`jaxsft compile`'s path: abstract inputs, the TPU compiler of
libtpu, no TPU needed) for each variant on v6e-1 (32 GB) and v5e-1 (16 GB), one after the other,
and prints a Markdown table for the README.

    JAX_PLATFORMS=cpu .venv/bin/python tools/lora_memory_table.py [--seq 2048] [--topologies v6e-1 v5e-1]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxsft import platforms  # noqa: E402,F401  (JAX_PLATFORMS before jax is imported)
from jaxsft.aot import compile_report  # noqa: E402
from jaxsft.config import load_config  # noqa: E402
from jaxsft.errors import ConfigError  # noqa: E402

CONFIG = ROOT / "configs" / "llama3.1-8b-lora-v6e-1.yaml"
VARIANTS = {  # name -> overrides of the LoRA config
    "full fine-tuning (float32 weights + Adam)": ["lora.rank=0", "model.param_dtype=float32"],
    "LoRA r16, bfloat16 base": [],
    "QLoRA r16, int8 base": ["lora.base_quant=int8"],
    "QLoRA r16, nf4 base": ["lora.base_quant=nf4"],
}


def measure(topology: str, overrides: list[str], seq: int) -> tuple[str, str]:
    """`(HBM cell, compile seconds)` of one variant on one topology."""
    cfg = load_config(CONFIG, [f"data.seq_len={seq}", "train.batch_size=1", *overrides])
    t = time.perf_counter()
    try:
        lines, fits = compile_report(cfg, topology)
    except ConfigError as e:  # the TPU compiler's out-of-memory report
        text = str(e)
        used = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", text)
        cell = f"does not fit: {used.group(1)} GiB needed, {used.group(2)} GiB usable" if used else "does not fit"
        return cell, f"{time.perf_counter() - t:.0f}"
    hbm = next(x for x in lines if x.startswith("HBM per chip"))
    need = re.search(r"HBM per chip: ([\d.,]+ GiB)", hbm).group(1)
    parts = next((x for x in lines if x.startswith("lora rank")), "")
    base = re.search(r"base \S+ ([\d.,]+ GiB)", parts)
    cell = f"{need}{' (base ' + base.group(1) + ')' if base else ''} {'fits' if fits else 'DOES NOT FIT'}"
    return cell, f"{time.perf_counter() - t:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--topologies", nargs="+", default=["v6e-1", "v5e-1"])
    a = p.parse_args()
    rows = []
    for name, overrides in VARIANTS.items():
        cells = []
        for topology in a.topologies:
            cell, seconds = measure(topology, overrides, a.seq)
            cells.append(f"{cell}, {seconds} s")
            print(f"{name} | {topology}: {cell} (compile + report {seconds} s)", file=sys.stderr, flush=True)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    print(f"Llama-3.1-8B, seq {a.seq}, batch 1, remat full, bfloat16 compute; per-chip HBM from the TPU compiler")
    print("| variant | " + " | ".join(a.topologies) + " |")
    print("|---|" + "---|" * len(a.topologies))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
