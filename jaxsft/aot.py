"""Ahead-of-time compilation of the real train step, with abstract inputs.

Nothing is loaded or allocated: the parameters, optimizer state and batch are `ShapeDtypeStruct`s
carrying the shardings training would give them, so the compiled step's `memory_analysis()` and
`cost_analysis()` are those of the run itself, on whatever devices the mesh names (the local
CPU, or the devices of a TPU topology described from a CPU host).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsft import parallel
from jaxsft.config import Config
from jaxsft.models import DTYPES, abstract_model
from jaxsft.models.families import args_from_hf_config
from jaxsft.train import make_optimizer, make_train_step


@dataclass
class CompiledStep:
    """A compiled train step and what it took to build."""

    compiled: Any  # jax.stages.Compiled
    args: Any  # ModelArgs
    params: Any  # abstract parameter tree (ShapeDtypeStructs)
    compile_s: float

    def memory(self) -> dict[str, int]:
        """Per-device bytes of the compiled step: arguments, outputs, temporaries, generated code."""
        m = self.compiled.memory_analysis()
        return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
                "code": m.generated_code_size_in_bytes}


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_state(hf_config: dict, cfg: Config, mesh: Mesh) -> tuple:
    """`(args, graphdef, state, tx, schedule)` with `state` made of sharded ShapeDtypeStructs."""
    args = args_from_hf_config(hf_config, param_dtype=DTYPES[cfg.model.param_dtype],
                               compute_dtype=DTYPES[cfg.model.compute_dtype], remat=cfg.model.remat)
    graphdef, variables = nnx.split(abstract_model(args))
    shardings = parallel.param_shardings(variables, mesh)
    params = _with_sharding(nnx.to_pure_dict(variables), shardings)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, params)
    # The optimizer state's shardings are what jit gives them from the params' (moments like params).
    init = jax.jit(tx.init).lower(params).compile()
    opt_state = _with_sharding(jax.eval_shape(tx.init, params), init.output_shardings)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    return args, graphdef, {"params": params, "opt_state": opt_state, "step": step}, tx, schedule


def abstract_batch(global_batch: int, seq_len: int, mesh: Mesh) -> dict:
    """The batch contract as sharded ShapeDtypeStructs."""
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=sharding)
            for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}


def compile_train_step(hf_config: dict, cfg: Config, mesh: Mesh) -> CompiledStep:
    """Lowers and compiles the train step `jaxsft.train` runs, for `cfg` on `mesh`."""
    args, graphdef, state, tx, schedule = abstract_state(hf_config, cfg, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = make_train_step(graphdef, tx, schedule, cfg.train.grad_accum, mesh, shardings, cfg.train.loss_chunk)
    t = time.perf_counter()
    compiled = step.lower(state, abstract_batch(cfg.train.batch_size, cfg.data.seq_len, mesh)).compile()
    return CompiledStep(compiled, args, state["params"], time.perf_counter() - t)
