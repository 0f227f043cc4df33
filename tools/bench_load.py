"""Peak host memory of loading a >1 GB checkpoint onto 8 (fake CPU) devices with `from_pretrained`.

Builds (once; reused from the cache directory) a Llama-architecture checkpoint of random float32
weights, written as safetensors straight from numpy one tensor at a time. Then, in a fresh process
with 8 CPU devices, makes an fsdp=8 mesh and loads the checkpoint sharded over it, and reports how
much the process's peak resident memory (VmHWM) grew during the load, as a multiple of the
checkpoint's size. The baseline is taken after importing what `jaxsft train` imports (jax, and
transformers through `jaxsft.train`, which alone is ~0.3 GB when torch is installed) and making
the mesh, so the growth is the weights plus the loader's working memory. On CPU the devices'
memory *is* host memory, so 1.0x is the floor: the sharded parameters themselves. Reads are
positioned reads, not mmap, so no file pages of the checkpoint are counted.

    .venv/bin/python tools/bench_load.py [--cache runs/bench_load] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# A Llama-2-like width; 4 layers make it about 1.26 GB in float32 (the embeddings are 0.52 GB of it).
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=2048,
              intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
              rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              tie_word_embeddings=False, dtype="float32")


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a Llama checkpoint."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * h
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    return shapes


def write_checkpoint(out: Path, cfg: dict) -> int:
    """Writes config.json and model.safetensors (random float32, one tensor in memory at a time); returns bytes."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the safetensors spec aligns the data to 8 bytes
    rng = np.random.default_rng(0)
    tmp = out / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            value = rng.standard_normal(shape, dtype=np.float32)
            value *= 1.0 if name.endswith("layernorm.weight") or name == "model.norm.weight" else 0.02
            f.write(value.tobytes())
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return offset


# Runs in the fresh 8-device process: prints one JSON line.
CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import jax
import jaxsft.train  # what `jaxsft train` imports before it loads (transformers included): code, not weights
from jaxsft.config import MeshConfig
from jaxsft.models import from_pretrained
from jaxsft.parallel import make_mesh
mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
baseline = status("VmRSS")
t0 = time.perf_counter()
model = from_pretrained(sys.argv[1], "float32", mesh=mesh)
leaves = jax.tree.leaves(model)
jax.block_until_ready(leaves)
seconds = time.perf_counter() - t0
held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "rss_after": status("VmRSS"), "seconds": seconds,
                  "devices": len(jax.devices()), "held": held}))
"""


def main() -> None:
    """Builds or reuses the checkpoint, measures the load in a fresh process and prints the result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench_load"))
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    cfg = dict(CONFIG, num_hidden_layers=a.layers)
    ckpt = Path(a.cache) / f"llama-{a.layers}l-{cfg['hidden_size']}"
    expected = sum(int(np.prod(s)) * 4 for s in tensor_shapes(cfg).values())
    weights = ckpt / "model.safetensors"
    if weights.is_file() and (ckpt / "config.json").is_file() and json.loads((ckpt / "config.json").read_text()) == cfg:
        print(f"checkpoint: {ckpt} (cached)")
    else:
        t0 = time.perf_counter()
        write_checkpoint(ckpt, cfg)
        print(f"checkpoint: {ckpt} (written in {time.perf_counter() - t0:.1f} s)")
    size = weights.stat().st_size
    assert size >= expected >= 1e9, (size, expected)

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(ckpt)], env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(done.stderr)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    gb = 1e9
    growth = r["peak"] - r["baseline"]
    print(f"  llama, {a.layers} layers, width {cfg['hidden_size']}, vocab {cfg['vocab_size']}: "
          f"{size / gb:.2f} GB of float32 safetensors")
    print(f"  loaded onto {r['devices']} CPU devices (mesh fsdp={r['devices']}) in {r['seconds']:.1f} s; "
          f"device arrays hold {r['held'] / gb:.2f} GB")
    print(f"  baseline RSS after importing jax + jaxsft.train and making the mesh: {r['baseline'] / gb:.2f} GB")
    print(f"  peak RSS during the load: {r['peak'] / gb:.2f} GB; growth over baseline {growth / gb:.2f} GB "
          f"= {growth / size:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
