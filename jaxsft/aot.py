"""Ahead-of-time compilation of the real train step, with abstract inputs, and the reports built
on it: `train --dry-run` (`dry_run`, this host's devices) and `jaxsft compile` (`compile_report`,
a TPU topology described from a CPU host).

Nothing is loaded or allocated: the parameters, optimizer state and batch are `ShapeDtypeStruct`s
carrying the shardings training would give them, so the compiled step's `memory_analysis()` and
`cost_analysis()` are those of the run itself, on whatever devices the mesh names (the local
CPU, or the devices of a TPU topology described from a CPU host).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsft import flops, lora, parallel
from jaxsft.config import Config, config_yaml
from jaxsft.errors import ConfigError
from jaxsft.models import DTYPES, abstract_model, read_hf_config
from jaxsft.monitor import memory_estimate, memory_line, shard_bytes
from jaxsft.stepspec import StepSpec, compiled_memory, data_bounds, step_line
from jaxsft.train import (check_model, frozen_shardings, make_optimizer, make_train_step, model_args,
                          opt_state_shardings)


@dataclass
class CompiledStep:
    """A compiled train step and what it took to build."""

    compiled: Any  # jax.stages.Compiled
    args: Any  # ModelArgs
    params: Any  # abstract parameter tree (ShapeDtypeStructs): with LoRA, the adapters
    compile_s: float
    line: str = ""  # `jaxsft.stepspec.step_line`: spec, program fingerprint, memory
    frozen: Any = None  # LoRA: the abstract frozen base (QArrays of ShapeDtypeStructs for QLoRA)
    opt_state: Any = None

    def memory(self) -> dict[str, int]:
        """Per-device bytes of the compiled step (`jaxsft.stepspec.compiled_memory`)."""
        return compiled_memory(self.compiled)


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_state(args, cfg: Config, mesh: Mesh) -> tuple:
    """`(args, graphdef, state, tx, schedule, frozen)` with `state` made of sharded
    ShapeDtypeStructs; with LoRA the state's params are the adapters and `frozen` the abstract
    base (quantized as QLoRA holds it), else None."""
    frozen = None
    if lora.enabled(cfg.lora):
        base_args = dataclasses.replace(args, param_dtype=DTYPES[cfg.lora.base_dtype])
        base_vars = nnx.state(abstract_model(base_args))
        frozen = nnx.to_pure_dict(base_vars)
        transform = lora.quantizer(cfg.lora, DTYPES[cfg.lora.base_dtype])
        if transform is not None:
            frozen = jax.tree_util.tree_map_with_path(
                lambda path, x: jax.eval_shape(lambda y: transform(lora.path_key(path), y), x), frozen)
        frozen = _with_sharding(frozen, frozen_shardings(frozen, base_vars, mesh))
        args = lora.model_args(args, cfg.lora)
    graphdef, variables = nnx.split(abstract_model(args))
    shardings = parallel.param_shardings(variables, mesh)
    params = _with_sharding(nnx.to_pure_dict(variables), shardings)
    if frozen is not None:
        params = lora.adapters_of(params)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, params)
    opt_state = _with_sharding(jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    return args, graphdef, {"params": params, "opt_state": opt_state, "step": step}, tx, schedule, frozen


def compile_train_step(model: dict | Any, cfg: Config, mesh: Mesh, spec: StepSpec | None = None) -> CompiledStep:
    """Lowers and compiles the train step `jaxsft.train` runs, for `cfg` on `mesh` with `spec`
    (default: the config's, without the data's bounds).

    `model` is the content of a Hugging Face `config.json`, or `ModelArgs`.
    """
    args = model_args(model, cfg) if isinstance(model, dict) else model
    spec = spec or StepSpec.of(cfg, mesh.devices.flat[0].platform)
    args, graphdef, state, tx, schedule, frozen = abstract_state(args, cfg, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    base = () if frozen is None else (frozen,)
    step = make_train_step(graphdef, tx, schedule, mesh, shardings, spec,
                           None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen), cfg.train.seed)
    lowered = step.lower(state, parallel.abstract_batch(cfg.train.batch_size, cfg.data.seq_len, mesh), *base)
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    return CompiledStep(compiled, args, state["params"], compile_s, step_line(spec, lowered, compiled, compile_s),
                        frozen, state["opt_state"])


# --------------------------------------------------------------------------- train --dry-run

def dry_run(cfg: Config, devices: list | None = None, compile_step: bool = True) -> list[str]:
    """What `train` would run, without loading weights or writing anything: the resolved config,
    parameter count, mesh, shardings of the largest parameters and memory per device (the estimate
    from the shardings; with `compile_step`, also the step `train` compiles, for this host's
    devices on abstract inputs, with the data's bounds when `data.train` is at hand)."""
    hf, args = check_model(cfg)
    mesh, dp = parallel.checked_mesh(cfg.mesh, cfg.train.batch_size, cfg.train.grad_accum, devices)
    _, _, state, _, _, frozen = abstract_state(args, cfg, mesh)
    params = state["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    n_params = lora.count(params) + (lora.count(frozen) if frozen is not None else 0)
    memory = memory_estimate(params, state["opt_state"], args, cfg.train.batch_size // (dp * cfg.train.grad_accum),
                             cfg.data.seq_len, jnp.dtype(DTYPES[cfg.model.compute_dtype]).itemsize, cfg.model.remat)
    lines = ["config (resolved):"] + ["  " + x for x in config_yaml(cfg).splitlines()]
    lines += [f"model: {hf.get('model_type', '?')}, {n_params:,} parameters ({cfg.model.param_dtype}), "
              f"{args.num_layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size}",
              f"mesh: {dict(mesh.shape)} on {mesh.devices.size} {mesh.devices.flat[0].platform} devices | global batch "
              f"{cfg.train.batch_size} x {cfg.data.seq_len}, {cfg.train.batch_size // dp} rows per data-parallel "
              f"rank, grad_accum {cfg.train.grad_accum}",
              "largest parameters (global shape -> partition spec -> per-device shard):"]
    for path, x in sorted(leaves, key=lambda kv: -kv[1].size)[:5]:
        lines.append(f"  {jax.tree_util.keystr(path)}  {list(x.shape)} -> {x.sharding.spec} -> "
                     f"{list(x.sharding.shard_shape(x.shape))} ({shard_bytes(x) / 2**20:,.2f} MiB)")
    lines += parallel.check_unsplit(nnx.state(abstract_model(args)), mesh, cfg.mesh.strict)
    lines.append(f"memory estimate: {memory_line(memory)}")
    if frozen is not None:
        lines.append(lora.summary_line(state["params"], frozen, cfg.lora))
    if compile_step:
        longest, max_trained, how = data_bounds(cfg)
        spec = StepSpec.of(cfg, mesh.devices.flat[0].platform, longest, max_trained)
        lines.append(f"step bounds: {how}")
        try:
            step = compile_train_step(args, cfg, mesh, spec)
            lines.append(step.line)
            if frozen is not None:
                lines.append(lora.memory_line(step.params, step.frozen, step.opt_state, step.memory(), cfg.lora))
        except Exception as e:  # noqa: BLE001 - the estimate above stands; say why there is no compiled number
            lines.append(f"compiled step: not available ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})")
    lines.append(f"run dir: {cfg.run.dir} (not created: dry run)")
    return lines


# --------------------------------------------------------------------------- TPU topologies

@dataclass(frozen=True)
class TpuChip:
    """Datasheet facts of one TPU generation."""

    hbm_gib: float  # per chip
    hbm_gbps: float  # HBM bandwidth per chip, GB/s
    dims: int  # 2: v5e/v6e slices are 2-D; 3: v4/v5p are 3-D tori
    cores_in_name: bool  # v4-8 / v5p-8 count TensorCores (2 per chip); v5e-8 / v6e-8 count chips


TPU_CHIPS = {
    "v4": TpuChip(32, 1200, 3, True),
    "v5p": TpuChip(95, 2765, 3, True),
    "v5e": TpuChip(16, 819, 2, False),
    "v6e": TpuChip(32, 1640, 2, False),
}


def parse_topology(name: str) -> tuple[str, str, int]:
    """`v5p-8` -> `("v5p", "2x2x1", 4 chips)`; `v5e:2x4` is taken as written."""
    generation, _, size = name.replace(":", "-", 1).partition("-")
    if generation not in TPU_CHIPS:
        raise ConfigError(f"--topology {name!r}: unknown TPU generation; known: {', '.join(TPU_CHIPS)}")
    chip = TPU_CHIPS[generation]
    if "x" in size:
        dims = [int(d) for d in size.split("x")]
        return generation, size, math.prod(dims)
    if not size.isdigit():
        raise ConfigError(f"--topology {name!r}: expected GENERATION-SIZE such as v5p-8 or v5e-16")
    chips = int(size) // 2 if chip.cores_in_name else int(size)
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"--topology {name!r}: {chips} chips is not a power of two")
    dims = [1] * chip.dims
    while math.prod(dims) < chips:  # grow the smallest side: 4 -> 2x2(x1), 8 -> 2x4 / 2x2x2, 16 -> 4x4 / 2x2x4
        dims[dims.index(min(dims))] *= 2
    dims = sorted(dims)
    if dims[0] == 1 and chip.dims == 3:  # 3-D slices are written with the short side last: 2x2x1
        dims = dims[1:] + [1]
    return generation, "x".join(map(str, dims)), chips


def topology_devices(name: str) -> tuple[list, str, int]:
    """The devices of a TPU slice described on this host (libtpu, no TPU needed): `(devices, generation, chips)`."""
    generation, shape, chips = parse_topology(name)
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{shape}")
    except Exception as e:  # no libtpu, or a shape libtpu rejects
        missing = isinstance(e, ImportError) or "INVALID_ARGUMENT" not in str(e)
        hint = " (is the TPU compiler installed? pip install 'jaxsft[tpu]')" if missing else ""
        if "lockfile" in str(e):  # libtpu allows one process per host; JAX takes it unless told the host is CPU-only
            hint = (" (another process on this host holds libtpu: any JAX program started without "
                    "JAX_PLATFORMS=cpu on a machine with libtpu installed does; wait for it or set that variable)")
        raise ConfigError(f"--topology {name!r}: cannot describe {generation}:{shape}: "
                          f"{str(e).splitlines()[0] if str(e) else e.__class__.__name__}{hint}") from None
    return list(desc.devices), generation, chips


# --------------------------------------------------------------------------- the compile report

def _cost(compiled) -> tuple[float, float]:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def compile_report(cfg: Config, topology: str) -> tuple[list[str], bool]:
    """Compiles the run's train step for a TPU topology from this host; returns report lines and
    whether the step fits in HBM. Raises `ConfigError` when the TPU compiler finds it does not fit."""
    devices, generation, chips = topology_devices(topology)
    chip = TPU_CHIPS[generation]
    mesh, _ = parallel.checked_mesh(cfg.mesh, cfg.train.batch_size, cfg.train.grad_accum, devices)
    args = model_args(read_hf_config(cfg.model.path), cfg)
    per_chip = len(devices) // chips  # devices per chip (v4 shows its two TensorCores as devices)
    unsplit = parallel.check_unsplit(nnx.state(abstract_model(args)), mesh, cfg.mesh.strict)
    longest, max_trained, how = data_bounds(cfg)
    spec = StepSpec.of(cfg, devices[0].platform, longest, max_trained)
    try:
        step = compile_train_step(args, cfg, mesh, spec)
    except Exception as e:  # the TPU compiler's own out-of-memory report names the largest buffers
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "HbmOom" in text or "memory" in text.lower():
            lines = [line for line in text.splitlines() if line.strip()][:40]
            raise ConfigError(f"the train step does not fit on {topology} ({_gib(chip.hbm_gib * 2**30)} HBM per "
                              f"chip); the TPU compiler says:\n  " + "\n  ".join(lines)) from None
        raise
    mem = step.memory()
    need_chip, hbm_chip = mem["total"] * per_chip, chip.hbm_gib * 2**30
    fits = need_chip <= hbm_chip

    n_params = lora.count(step.params) + (lora.count(step.frozen) if step.frozen is not None else 0)
    model_flops = flops.train_flops_per_position(step.params, args, cfg.data.seq_len, step.frozen) * (
        cfg.train.batch_size * cfg.data.seq_len)
    xla_flops, _ = _cost(step.compiled)
    peak_chip = flops.device_peak_flops(devices[0], cfg.model.compute_dtype) * per_chip
    # Roofline: a step takes at least the FLOPs it executes at peak (with remat=full every layer's
    # forward runs twice: 8 of the model's 6 FLOPs per parameter and token), and at least the time
    # to read the state and write it back and to write and read its temporaries once at full HBM
    # bandwidth. MFU counts the model's FLOPs only, so recomputation lowers it.
    executed = model_flops * (8 / 6 if cfg.model.remat == "full" else 1.0)
    traffic = (mem["argument"] + mem["output"] + 2 * mem["temp"]) * per_chip
    compute_s, memory_s = executed / chips / peak_chip, traffic / (chip.hbm_gbps * 1e9)
    step_s = max(compute_s, memory_s)
    mfu = model_flops / chips / step_s / peak_chip

    lines = [
        f"topology {topology}: {chips} chips ({devices[0].device_kind}, {len(devices)} devices), "
        f"mesh {dict(mesh.shape)}",
        f"model {cfg.model.path}: {n_params / 1e9:.2f}B parameters, {args.num_layers} layers; "
        f"global batch {cfg.train.batch_size} x {cfg.data.seq_len}, grad_accum {cfg.train.grad_accum}, "
        f"params {cfg.model.param_dtype if step.frozen is None else 'base ' + cfg.lora.base_dtype}, compute {cfg.model.compute_dtype}, remat {cfg.model.remat}",
        f"step bounds: {how}",
        *unsplit,
        *([lora.memory_line(step.params, step.frozen, step.opt_state, mem, cfg.lora, per_chip)]
          if step.frozen is not None else []),
        step.line,
        f"compile time: {step.compile_s:.1f} s",
        f"HBM per chip: {_gib(need_chip)} needed of {_gib(hbm_chip)} "
        f"(arguments {_gib(mem['argument'] * per_chip)}, temporaries {_gib(mem['temp'] * per_chip)}, "
        f"code {_gib(mem['code'] * per_chip)}) -> {'fits' if fits else 'DOES NOT FIT'}",
        f"FLOPs per step: model {'6N' if step.frozen is None else '4N frozen + 6N adapters'}+12LHT {model_flops:.3e} ({model_flops / chips:.3e} per chip); "
        f"XLA cost analysis {xla_flops * per_chip:.3e} per chip (it counts a loop body once: the scanned "
        f"layers as one layer)",
        f"estimated step time >= {step_s:.3g} s (roofline: {peak_chip / 1e12:.0f} TFLOP/s and "
        f"{chip.hbm_gbps:.0f} GB/s per chip; {'compute' if compute_s >= memory_s else 'HBM'}-bound) -> "
        f"MFU <= {100 * mfu:.1f}%, "
        f"<= {cfg.train.batch_size * cfg.data.seq_len / step_s:,.0f} tokens/s",
    ]
    if not fits:
        lines.append("largest per-chip arrays of the train state:")
        lines += [f"  {_gib(size)}  {name}" for size, name in largest_state_arrays(step, per_chip)]
    return lines, fits


def largest_state_arrays(step: CompiledStep, per_chip: int, n: int = 5) -> list[tuple[int, str]]:
    """The `n` parameters whose per-chip shards are largest (optimizer moments follow them)."""
    sizes = []
    for path, x in jax.tree_util.tree_leaves_with_path(step.params):
        shard = x.sharding.shard_shape(x.shape)
        sizes.append((math.prod(shard) * x.dtype.itemsize * per_chip, jax.tree_util.keystr(path)))
    return sorted(sizes, reverse=True)[:n]
