"""Device mesh, logical-axis rules, and the shardings of parameters and batches.

Model code names its axes logically (`embed`, `heads`, `mlp`, `vocab`, `batch`, `length`, ...);
`RULES` is the one table that maps those names to the mesh axes `data`, `fsdp`, `tensor`.
Changing the parallelism is a config change (`mesh.*`), never a model change.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxsft.config import MeshConfig
from jaxsft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it is split over (None: replicated). Parameters are split over fsdp
# along `embed` (ZeRO-3 style) and over tensor along heads / mlp / vocab (Megatron style);
# activations are split over data and fsdp along `batch`.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": ("fsdp",),
    "act_embed": None,
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
    "layers": None,
    # The output head and the loss (jaxsft.loss) are vocabulary-parallel: the head `[D, V]` is split
    # along V over fsdp and tensor (along D only where V does not divide), each chunk of rows is
    # gathered over fsdp, and a device computes every row's logits for its share of the vocabulary.
    # Its gradient is then computed where it is stored: no whole `[D, V]` float32 partial sum, no
    # all-gathered head, no reshuffle before the optimizer (1.2 GiB per chip for Llama 3 8B on v5p-8).
    "head_embed": ("fsdp",),
    "head_vocab": ("fsdp", "tensor"),
    "loss_batch": ("data",),
    "lora_rank": None,  # LoRA adapters (jaxsft.lora): split like the weights they adapt, never along the rank
}
# Dimensions of these logical axes take their mesh axes before the other dimensions of an array.
FIRST = ("head_vocab",)


def initialize_distributed() -> bool:
    """Joins a multi-process job when this process is one of several; returns whether it did.

    Explicit: `JAXSFT_COORDINATOR` (host:port of process 0), `JAXSFT_NUM_PROCESSES` and
    `JAXSFT_PROCESS_ID`, anywhere (the launch/local_multi.sh path). Detected by JAX itself: a
    multi-host Cloud TPU slice (several `TPU_WORKER_HOSTNAMES`) and SLURM jobs of several tasks.
    CPU processes exchange collectives over gloo.
    """
    env = os.environ
    explicit = "JAXSFT_COORDINATOR" in env
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
    if not (explicit or tpu_pod or slurm):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        missing = [k for k in ("JAXSFT_NUM_PROCESSES", "JAXSFT_PROCESS_ID") if k not in env]
        if missing:
            raise ConfigError(f"JAXSFT_COORDINATOR is set but {' and '.join(missing)} is not: a multi-process job "
                              f"needs all three (see launch/local_multi.sh)")
        jax.distributed.initialize(coordinator_address=env["JAXSFT_COORDINATOR"],
                                   num_processes=int(env["JAXSFT_NUM_PROCESSES"]),
                                   process_id=int(env["JAXSFT_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `data x fsdp x tensor` mesh; a -1 size takes the devices the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, v in sizes.items():
        if v == -1:
            if len(devices) % fixed:
                raise ConfigError(f"mesh: {len(devices)} devices cannot be split with the fixed sizes "
                                  f"{ {k: s for k, s in sizes.items() if s != -1} } ('mesh.{axis}' is -1)")
            sizes[axis] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(f"mesh: mesh.data x mesh.fsdp x mesh.tensor = {sizes['data']} x {sizes['fsdp']} x "
                          f"{sizes['tensor']} = {math.prod(sizes.values())}, but there are {len(devices)} devices")
    shape = tuple(sizes[a] for a in MESH_AXES)
    # jax.make_mesh orders devices by the physical topology (ICI rings on TPU, NVLink on GPU).
    # Auto axes: shardings propagate through the step (GSPMD), pinned only where we constrain them.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array with these logical axes; a mesh axis that does not divide the
    dimension (or is already used by an earlier dimension) is dropped, so the array is replicated
    along it rather than failing."""
    used: set[str] = set()
    spec: list = [None] * len(axes)
    order = sorted(range(len(axes)), key=lambda i: axes[i] not in FIRST)  # stable: FIRST, then in order
    for i in order:
        name, dim = axes[i], shape[i]
        mesh_axes = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis '{name}' has no rule in jaxsft.parallel.RULES")
        kept = []
        for ax in mesh_axes or ():
            size = mesh.shape[ax]
            if ax not in used and size > 1 and dim % (size * math.prod(mesh.shape[k] for k in kept)) == 0:
                kept.append(ax)
        used.update(kept)
        spec[i] = tuple(kept) if len(kept) > 1 else (kept[0] if kept else None)
    return P(*spec)


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """NamedSharding for an array with these logical axes."""
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def param_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for a tree of `nnx.Variable`s carrying `axes` metadata (a pure-dict tree results)."""
    from flax import nnx

    def one(var):
        axes, shape = var.get_metadata().get("axes"), var.get_value().shape
        if axes is None:
            raise KeyError(f"parameter of shape {shape} has no logical axes")
        return logical_sharding(axes, shape, mesh)

    shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Places every array not already sharded on `mesh` (scalars such as step counters) replicated on it."""
    replicated = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `[batch, length]` array of the batch contract."""
    return NamedSharding(mesh, P(RULES["batch"], None))


def abstract_batch(global_batch: int, seq_len: int, mesh: Mesh) -> dict:
    """The batch contract as sharded ShapeDtypeStructs (to lower a step without data)."""
    from jaxsft.data.pack import BATCH_KEYS

    sharding = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((global_batch, seq_len), np.int32, sharding=sharding) for k in BATCH_KEYS}


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in RULES["batch"])


# The mesh that `constrain` uses while a step is traced; None outside (then `constrain` is a no-op).
_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jaxsft_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """Within this block, `constrain` pins activations to the mesh by their logical axes."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the step being traced (inside `activation_sharding`), or None."""
    return _ACTIVE_MESH.get()


def mesh_axes(name: str, dim: int, mesh: Mesh) -> str | tuple[str, ...] | None:
    """The mesh axes a dimension of logical axis `name` and size `dim` is split over (a
    PartitionSpec entry), as `logical_to_spec` splits it."""
    return logical_to_spec((name,), (dim,), mesh)[0]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axis names (model code calls this)."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(axes, x.shape, mesh))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's local rows (batch contract arrays)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def global_max(x: int) -> int:
    """The largest of every process's `x` (every process must call it)."""
    if jax.process_count() == 1:
        return int(x)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(x, np.int32))))
