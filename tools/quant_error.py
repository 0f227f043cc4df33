"""How much QLoRA's quantized base moves a model: int8 and NF4 (qwix, `lora.quant_block`
elements per scale) against float32, on held-out demo texts.

    JAX_PLATFORMS=cpu .venv/bin/python tools/quant_error.py MODEL_DIR [--block 64] [--texts 4] [--tokens 96]

Prints, per quantization: the largest logit difference against the largest logit, top-1 agreement,
the mean KL(float32 || quantized) per position, and the next-token NLL of the texts under both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxsft import platforms  # noqa: E402,F401  (JAX_PLATFORMS before jax is imported)


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoTokenizer

    from jaxsft import lora
    from jaxsft.config import LoraConfig
    from jaxsft.models import from_pretrained

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--texts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=96)
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    records = [json.loads(x) for x in (ROOT / "configs" / "demo_data" / "eval.jsonl").read_text().splitlines()]
    ids = [tok(r["prompt"] + " " + r["completion"])["input_ids"][:a.tokens] for r in records[:a.texts]]
    n = min(map(len, ids))
    tokens = jnp.asarray([x[:n] for x in ids])
    ref = np.asarray(from_pretrained(a.model)(tokens))
    lp = jax.nn.log_softmax(ref)

    def nll(logp):
        return float(-jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean())

    print(f"{a.model}: {a.texts} texts x {n} tokens, blocks of {a.block}; float32 NLL {nll(lp):.3f}, "
          f"largest logit {np.abs(ref).max():.1f}")
    for quant in ("int8", "nf4"):
        transform = lora.quantizer(LoraConfig(rank=1, base_quant=quant, quant_block=a.block), jnp.float32)
        got = np.asarray(from_pretrained(a.model, transform=transform)(tokens))
        lq = jax.nn.log_softmax(got)
        kl = float((jnp.exp(lp) * (lp - lq)).sum(-1).mean())
        print(f"{quant}: max |logit diff| {np.abs(got - ref).max():.3f} ({100 * np.abs(got - ref).max() / np.abs(ref).max():.1f}% "
              f"of the largest logit), top-1 agreement {100 * (got.argmax(-1) == ref.argmax(-1)).mean():.1f}%, "
              f"KL {kl:.4f}, NLL {nll(lq):.3f}")


if __name__ == "__main__":
    main()
