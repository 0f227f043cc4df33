"""After the demo: how far the held-out loss fell, and what the exported model now writes.

    python tools/demo_report.py RUN_DIR EXPORT_DIR

Loads the export with plain `transformers` (as a user deploying it would) and greedily completes
a few held-out prompts, checking whether each answer is valid JSON equal to the reference.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxsft.config import load_config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--examples", type=int, default=20)
    a = ap.parse_args()

    records = [json.loads(x) for x in (a.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    first, last = evals[0][1], evals[-1][1]
    print(f"held-out completion loss: {first:.3f} (step {evals[0][0]}) -> {last:.3f} (step {evals[-1][0]}), "
          f"{first / last:.1f}x lower")

    tok = AutoTokenizer.from_pretrained(a.export_dir)
    model = AutoModelForCausalLM.from_pretrained(a.export_dir, dtype=torch.float32).eval()
    eval_file = Path(load_config(a.run_dir / "config.yaml").data.eval[0])
    held_out = [json.loads(x) for x in eval_file.read_text().splitlines()[: a.examples]]
    valid = exact = fields_right = fields_total = 0
    for i, rec in enumerate(held_out):
        ids = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=80, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        reference = json.loads(rec["completion"])
        fields_total += len(reference)
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            answer = None
        if isinstance(answer, dict):
            valid += 1
            exact += answer == reference
            fields_right += sum(answer.get(k) == v for k, v in reference.items())
        if i < 3:
            print(f"\nprompt:    {rec['prompt'].splitlines()[-1]}\ngenerated: {text}\nreference: {rec['completion']}")
    print(f"\nexport {a.export_dir} loads in transformers; on {len(held_out)} held-out prompts: "
          f"{valid} valid JSON objects, {exact} exact matches, {fields_right}/{fields_total} fields right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
