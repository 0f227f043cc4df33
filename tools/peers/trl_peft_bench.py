#!/usr/bin/env python3
"""Peer benchmark, LoRA: Hugging Face TRL SFTTrainer with a peft LoRA adapter (PyTorch), the
shared peer script `../shared/peers/trl_sft_bench.py` with `peft_config` added and nothing else
changed (same data, packing, completion-only loss, float32 on the CPU, step timer).

    .venv/bin/python tools/peers/trl_peft_bench.py MODEL_DIR DATA.jsonl --steps 13 --batch 8 --seq 512 \\
        --rank 16 --alpha 32
Prints: `trl tokens_per_s=<packed positions per second> step_s=<median seconds per step>`.
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "shared" / "peers"))
from trl_sft_bench import StepTimer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    ds = Dataset.from_list([json.loads(line) for line in open(a.data) if line.strip()])
    timer = StepTimer()
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=a.steps, per_device_train_batch_size=a.batch,
                    max_length=a.seq, packing=True, completion_only_loss=True, learning_rate=1e-4,
                    logging_steps=a.steps, save_strategy="no", report_to=[], use_cpu=True,
                    dataloader_num_workers=0, bf16=False, disable_tqdm=True)
    lora = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer],
               peft_config=lora).train()
    step_s = statistics.median(timer.times)
    print(f"trl tokens_per_s={a.batch * a.seq / step_s:.1f} step_s={step_s:.3f}")


if __name__ == "__main__":
    main()
