"""Compile time of the real train step at 2 and 16 layers of the same width.

The decoder applies its stacked layers with `jax.lax.scan`, so the compiled program holds one
layer body whatever the depth: compile time should barely move from 2 to 16 layers. This builds
the step exactly as training does (`jaxsft.train.make_optimizer` + `make_train_step`: masked loss,
gradients, AdamW, donated state), lowers it on abstract shapes (nothing is allocated) and compiles
it, on this machine's first device.

    .venv/bin/python tools/bench_compile.py [--hidden 2048 --mlp 5632 --heads 32 --kv-heads 8 \\
        --vocab 32000 --seq 2048 --batch 8 --remat none]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxsft.config import MeshConfig, OptimizerConfig  # noqa: E402
from jaxsft.models import abstract_model  # noqa: E402
from jaxsft.models.decoder import ModelArgs  # noqa: E402
from jaxsft.parallel import make_mesh, param_shardings  # noqa: E402
from jaxsft.train import make_optimizer, make_train_step  # noqa: E402


def compile_seconds(args: ModelArgs, batch: int, seq: int, mesh) -> tuple[float, float]:
    """`(trace + lower, compile)` seconds of the train step for the model `args` describes."""
    graphdef, abstract = nnx.split(abstract_model(args))
    params = nnx.to_pure_dict(abstract)
    shardings = param_shardings(abstract, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=10), 100, params)
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                             jax.eval_shape(tx.init, params))
    state = {"params": params, "opt_state": opt_state,
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step = make_train_step(graphdef, tx, schedule, mesh, state_shardings)
    row = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    batch_spec = {k: row for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    t0 = time.perf_counter()
    lowered = step.lower(state, batch_spec)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    """Prints the compile times at 2 and 16 layers and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    a = p.parse_args()
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])

    def args(layers: int) -> ModelArgs:
        return ModelArgs(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.mlp, num_layers=layers,
                         num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.hidden // a.heads, remat=a.remat)

    compile_seconds(args(1), a.batch, a.seq, mesh)  # warm-up: one-time tracing and compiler start-up costs
    print(f"train step compile time (jaxsft.train.make_train_step, AdamW) on 1 {jax.devices()[0].platform.upper()} "
          f"device; width {a.hidden}, {a.heads} heads ({a.kv_heads} kv), mlp {a.mlp}, vocab {a.vocab}, "
          f"batch {a.batch} x {a.seq}, remat {a.remat}")
    totals = {}
    for layers in (2, 16):
        lower, comp = compile_seconds(args(layers), a.batch, a.seq, mesh)
        totals[layers] = lower + comp
        print(f"  {layers:2d} layers: trace+lower {lower:5.2f} s, compile {comp:5.2f} s, total {totals[layers]:5.2f} s")
    print(f"  ratio 16 / 2 layers: {totals[16] / totals[2]:.2f}")


if __name__ == "__main__":
    main()
