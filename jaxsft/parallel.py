"""Device mesh, logical-axis rules, and the shardings of parameters and batches.

Model code names its axes logically (`embed`, `heads`, `mlp`, `vocab`, `batch`, `length`, ...);
`RULES` is the one table that maps those names to the mesh axes `data`, `fsdp`, `tensor`;
`mesh.rules` overrides entries of it. Changing the parallelism is a config change (`mesh.*`),
never a model change. A rule that cannot split a parameter (a mesh axis that does not divide its
dimension) is listed by `unsplit_report`, and is an error under `mesh.strict`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

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

# The rules each mesh was made with, by mesh (see `rules`).
_MESH_RULES: dict[Mesh, dict[str, tuple[str, ...] | None]] = {}


def resolve_rules(overrides: Mapping[str, Sequence[str] | None]) -> dict[str, tuple[str, ...] | None]:
    """`RULES` with `overrides` (`mesh.rules`: logical axis -> mesh axes, or None for replicated)
    merged over them; a name that is not a logical axis, or not a mesh axis, is a `ConfigError`
    naming the key `mesh.rules.<name>`."""
    merged = dict(RULES)
    for name, axes in overrides.items():
        key = f"config key 'mesh.rules.{name}'"
        if name not in RULES:
            raise ConfigError(f"{key}: '{name}' is not a logical axis; logical axes: {', '.join(RULES)}")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())  # one name, as the config reads it
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"{key}: '{bad[0]}' is not a mesh axis; mesh axes: {', '.join(MESH_AXES)} "
                              f"(null: replicated)")
        if len(set(axes)) != len(axes):
            raise ConfigError(f"{key} names a mesh axis twice: {list(axes)}")
        merged[name] = axes or None
    return merged


def rules(mesh: Mesh | None) -> dict[str, tuple[str, ...] | None]:
    """The logical-axis rules of `mesh`: `RULES` merged with the `mesh.rules` it was made with.

    The rules belong to the mesh rather than to a config threaded through the code: `make_mesh`
    records them beside the mesh it returns, and whatever maps logical axes to that mesh
    (`logical_to_spec`, the batch sharding, `constrain` in model code) reads them from the mesh it
    is given. A mesh not made by `make_mesh` follows `RULES`. JAX gives equal meshes (the same
    devices and axes) one identity, so the newest `make_mesh` of a layout sets its rules: one
    process runs one config.
    """
    return _MESH_RULES.get(mesh, RULES)


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
    """Builds the `data x fsdp x tensor` mesh; a -1 size takes the devices the others leave. The
    mesh follows `RULES` merged with `cfg.rules` (see `rules`)."""
    table = resolve_rules(cfg.rules)
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
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    _MESH_RULES[mesh] = table
    return mesh


def _split(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> tuple[P, list[tuple[int, str, str]]]:
    """`logical_to_spec`'s PartitionSpec, and `(dimension, mesh axis, why)` for each mesh axis of
    size > 1 that a rule wanted for a dimension but the array is not split over at all."""
    table = rules(mesh)
    used: set[str] = set()
    spec: list = [None] * len(axes)
    dropped = []
    order = sorted(range(len(axes)), key=lambda i: axes[i] not in FIRST)  # stable: FIRST, then in order
    for i in order:
        name, dim = axes[i], shape[i]
        if name is not None and name not in table:
            raise KeyError(f"logical axis '{name}' has no rule in jaxsft.parallel.RULES")
        kept: list[str] = []
        for ax in (table[name] if name is not None else None) or ():
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            split = size * math.prod(mesh.shape[k] for k in kept)
            if dim % split == 0:
                kept.append(ax)
            else:
                sizes = " x ".join(f"{k}={mesh.shape[k]}" for k in kept + [ax])
                dropped.append((i, ax, f"{dim} is not divisible by {split}" + (f" ({sizes})" if kept else "")))
        used.update(kept)
        spec[i] = tuple(kept) if len(kept) > 1 else (kept[0] if kept else None)
    # An axis taken by an earlier (or later) dimension still splits the array: it costs nothing.
    return P(*spec), [d for d in dropped if d[1] not in used]


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array with these logical axes, by `rules(mesh)`; a mesh axis that does
    not divide the dimension (or is already used by an earlier dimension) is dropped, so the array
    is replicated along it rather than failing (`unsplit_report` lists where)."""
    return _split(axes, shape, mesh)[0]


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """NamedSharding for an array with these logical axes."""
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def _axes(var: Any) -> tuple[str | None, ...]:
    """The logical axes of an `nnx.Variable`."""
    axes = var.get_metadata().get("axes")
    if axes is None:
        raise KeyError(f"parameter of shape {var.get_value().shape} has no logical axes")
    return axes


def _is_variable(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def param_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for a tree of `nnx.Variable`s carrying `axes` metadata (a pure-dict tree results)."""
    from flax import nnx

    shardings = jax.tree.map(lambda var: logical_sharding(_axes(var), var.get_value().shape, mesh), abstract_state,
                             is_leaf=_is_variable)
    return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


class Unsplit(NamedTuple):
    """A parameter dimension that a rule wanted split over a mesh axis but that is left whole, so
    the parameter is replicated along that axis."""

    path: str  # the parameter, as `jax.tree_util.keystr` writes it
    shape: tuple[int, ...]
    logical: str  # the dimension's logical axis
    mesh_axis: str
    size: int  # of the mesh axis
    why: str
    bytes: int  # per device: the shard as placed minus the shard the split would have given


def unsplit_report(abstract_state: Any, mesh: Mesh) -> list[Unsplit]:
    """Every parameter dimension of a tree of `nnx.Variable`s with `axes` metadata (the abstract
    model's `nnx.state`) that its rule wanted split over a mesh axis of size > 1 but that
    `logical_to_spec` leaves whole because the axis does not divide it. An axis already taken by
    another dimension of the same array is not listed: the array is split over it all the same."""
    found = []
    for path, var in jax.tree_util.tree_leaves_with_path(abstract_state, is_leaf=_is_variable):
        axes, value = _axes(var), var.get_value()
        spec, dropped = _split(axes, value.shape, mesh)
        ways = math.prod(mesh.shape[a] for entry in spec if entry is not None
                         for a in (entry if isinstance(entry, tuple) else (entry,)))
        placed = math.prod(value.shape) * np.dtype(value.dtype).itemsize // ways
        for i, ax, why in dropped:
            size = mesh.shape[ax]
            found.append(Unsplit(jax.tree_util.keystr(path), tuple(value.shape), axes[i], ax, size, why,
                                 placed - placed // size))
    return found


def _size(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.2f} KiB"


def check_unsplit(abstract_state: Any, mesh: Mesh, strict: bool = False) -> list[str]:
    """`unsplit_report` as lines for people (none when every rule splits what it asks); with
    `strict` (`mesh.strict`) any such parameter is a `ConfigError` naming the mesh axis's key and
    the first parameter."""
    found = unsplit_report(abstract_state, mesh)
    if not found:
        return []
    u = found[0]
    if strict:
        raise ConfigError(f"config key 'mesh.{u.mesh_axis}' ({u.size}) cannot split parameter {u.path} "
                          f"{list(u.shape)} along '{u.logical}': {u.why}, and mesh.strict is true ({len(found)} "
                          f"such dimensions in all; `jaxsft train --dry-run` lists them). Use a mesh size that "
                          f"divides, map '{u.logical}' elsewhere in mesh.rules, or set mesh.strict=false")
    lines = [f"warning: {len(found)} parameter dimensions are not split as the sharding rules ask, so they are "
             f"replicated: {_size(sum(x.bytes for x in found))} more per device for the parameters (their "
             f"gradients and optimizer moments alike); mesh.strict=true makes this an error:"]
    lines += [f"  {x.path} {list(x.shape)}: '{x.logical}' not split over {x.mesh_axis} ({x.size}): {x.why}; "
              f"+{_size(x.bytes)} per device" for x in found]
    return lines


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
    return NamedSharding(mesh, P(rules(mesh)["batch"], None))


def abstract_batch(global_batch: int, seq_len: int, mesh: Mesh) -> dict:
    """The batch contract as sharded ShapeDtypeStructs (to lower a step without data)."""
    from jaxsft.data.pack import BATCH_KEYS

    sharding = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((global_batch, seq_len), np.int32, sharding=sharding) for k in BATCH_KEYS}


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in rules(mesh)["batch"] or ())


def checked_mesh(cfg: MeshConfig, batch_size: int, grad_accum: int,
                 devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, int]:
    """`(mesh, data-parallel size)`, with a clear error when the global batch `batch_size` does not
    split evenly into the data-parallel ranks times `grad_accum` micro-batches."""
    mesh = make_mesh(cfg, devices)
    dp = data_parallel_size(mesh)
    if batch_size % (dp * grad_accum):
        raise ConfigError(f"config key 'train.batch_size' ({batch_size}) must be divisible by the "
                          f"data-parallel size mesh.data x mesh.fsdp ({dp}) times train.grad_accum ({grad_accum})")
    return mesh, dp


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
