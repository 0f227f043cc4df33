"""Training: the train state, the one jitted sharded step, and the loop.

The train state is a plain dict `{"params", "opt_state", "step"}` of (sharded) arrays. The step
sums the masked cross entropy and its gradient over micro-batches, divides once by the number of
trained tokens in the whole global batch, and applies AdamW (clipped, scheduled).

The loop resumes from the newest complete checkpoint (bitwise the same run on the same mesh, and
resharded onto any other), saves asynchronously every `checkpoint.every` steps, saves and stops at
the next step boundary on SIGTERM or SIGINT, and stops on (or skips, `train.nonfinite`) a step whose
loss or gradient norm is not finite, never saving non-finite parameters. One run at a time holds a
run directory, and a resume may not silently change its data or model (`jaxsft.rundir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx

from jaxsft import evalgen, flops, lora, parallel, rundir
from jaxsft.checkpoint import Checkpointer, Preemption, SavedArrays, abstract_like
from jaxsft.config import Config, ModelConfig, OptimizerConfig, config_yaml, to_dict
from jaxsft.data.pack import longest_segment, most_trained
from jaxsft.data.pipeline import check_shards, eval_batches, process_batch, train_batches
from jaxsft.data.render import load_tokenizer
from jaxsft.errors import (ConfigError, DataError, Interrupted, JaxsftError, ModelError, NonFiniteError, disk_full,
                           is_disk_full)
from jaxsft.loss import held_out_loss, loss_sums, make_eval_step
from jaxsft.models import DTYPES, abstract_model, args_from_hf_config, from_pretrained, read_hf_config
from jaxsft.stepspec import StepSpec, eval_spec, step_line
from jaxsft.monitor import MetricsLog, atomic_write_text, info, memory_estimate, summary_lines

def decay_mask(params: Any, decay_all: bool = False) -> Any:
    """True for the parameters weight decay applies to: projection kernels (the output head
    included) and LoRA adapters, not norms, biases or the embedding table, unless `decay_all`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decay_all or getattr(path[-1], "key", None) in ("kernel",) + lora.ADAPTER_KEYS, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int,
                   params: Any = None) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warmup then the configured decay, and global-norm clipping.

    With `params` (the parameter tree, or one of the same structure) weight decay skips norms,
    biases and embeddings unless `cfg.decay_norms_biases_embeddings`.
    """
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup]) if warmup else decay
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    mask = None if params is None else decay_mask(params, cfg.decay_norms_biases_embeddings)
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
    return optax.chain(*parts), schedule


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, mesh) -> Any:
    """Shardings of the optimizer state: each moment like its parameter (so FSDP shards Adam's
    state too), counters and other scalars replicated. `params` are arrays or ShapeDtypeStructs
    carrying their shardings."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                                 jax.tree.map(lambda x: x.sharding, params),
                                 transform_non_params=lambda _: replicated)


def init_state(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, total_steps: int, mesh) -> tuple:
    """Loads the model onto `mesh` and builds the train state.

    Returns `(model, graphdef, state, tx, schedule)`: the state is `{"params", "opt_state",
    "step"}` of arrays sharded by the logical-axis rules (optimizer moments like their params).
    """
    model = from_pretrained(model_cfg.path, model_cfg.param_dtype, compute_dtype=model_cfg.compute_dtype,
                            remat=model_cfg.remat, scan_layers=model_cfg.scan_layers, mesh=mesh)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx, schedule = make_optimizer(opt_cfg, total_steps, params)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
    return model, graphdef, parallel.on_mesh(state, mesh), tx, schedule


def frozen_shardings(frozen: Any, abstract: nnx.State, mesh) -> Any:
    """Shardings of a frozen base tree whose leaves may be QArrays (values like their kernel,
    scales by the kernel's logical axes on their own shape); `abstract` holds the variables' axes."""
    axes = {tuple(str(k) for k in path): var.get_metadata()["axes"] for path, var in nnx.to_flat_state(abstract)}
    return lora.quantized_shardings(frozen, lambda key, shape: parallel.logical_sharding(axes[key], shape, mesh))


def init_lora_state(cfg: Config, mesh) -> tuple:
    """Loads the frozen base onto `mesh` (quantized as it loads, for QLoRA) and builds the adapters'
    train state. Returns `(args, graphdef, state, frozen, tx, schedule)`: `state` is `{"params"
    (the adapters), "opt_state", "step"}`, `frozen` the base tree, `graphdef` the model with adapters."""
    mc, lc = cfg.model, cfg.lora
    transform = lora.quantizer(lc, DTYPES[lc.base_dtype])
    base = from_pretrained(mc.path, lc.base_dtype, compute_dtype=mc.compute_dtype, remat=mc.remat,
                           scan_layers=mc.scan_layers, mesh=mesh, transform=transform)
    args = lora.model_args(base.args, lc)
    graphdef, abstract = nnx.split(abstract_model(args))
    frozen = nnx.to_pure_dict(nnx.state(base))
    if transform is not None:  # QLoRA: the scales take the kernels' logical axes
        frozen = jax.device_put(frozen, frozen_shardings(frozen, abstract, mesh))
    adapter_shardings = lora.adapters_of(parallel.param_shardings(abstract, mesh))
    abstract_adapters = lora.adapters_of(nnx.to_pure_dict(abstract))
    if lc.init_from:
        from jaxsft.peft_io import read_adapter

        adapters = jax.device_put(lora.checked_adapter(read_adapter(lc.init_from, abstract_adapters), lc),
                                  adapter_shardings)
    else:
        adapters = jax.jit(lambda: lora.init_adapters(abstract_adapters, cfg.train.seed),
                           out_shardings=adapter_shardings)()
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, adapters)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, adapters, mesh))(adapters)
    state = {"params": adapters, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
    return args, graphdef, parallel.on_mesh(state, mesh), frozen, tx, schedule


def make_train_step(graphdef, tx, schedule, mesh, state_shardings, spec: StepSpec = StepSpec(),
                    frozen_shardings: Any = None, seed: int = 0):
    """The jitted step `(state, batch) -> (state, metrics)`, state donated, shardings fixed.

    The loss is one sum over every trained token of the global batch (all micro-batches, all
    devices) divided once by their count, so the update does not depend on how the batch is split.
    `metrics["finite"]` says whether the loss and gradient norm were finite; with
    `spec.nonfinite == "skip"` a step where they are not leaves the parameters and optimizer state
    as they were. Everything else static (attention backend, the data's bounds, the loss
    chunking, `grad_accum`) comes from `spec`.

    With `frozen_shardings` (LoRA) the step is `(state, batch, frozen) -> (state, metrics)`: the
    state's params are the adapters, `frozen` the base (read, never differentiated, not donated),
    and the adapters' dropout draws from `seed` and the step number.
    """
    grad_fn = jax.value_and_grad(lambda p, b, f, k: loss_sums(graphdef, p, b, spec, f, k), has_aux=True)
    grad_accum, nonfinite = spec.grad_accum, spec.nonfinite

    def step(state, batch, frozen=None):
        with parallel.activation_sharding(mesh):
            params = state["params"]
            # RBG keys (XLA's RngBitGenerator), as MaxText draws its dropout: threefry masks of every
            # layer's activations took the TPU compiler over ten times longer to compile.
            key = None if frozen is None else jax.random.fold_in(jax.random.key(seed, impl="rbg"), state["step"])
            if grad_accum == 1:
                (loss_sum, (n, correct)), grads = grad_fn(params, batch, frozen, key)
            else:
                # Micro-batch a takes rows a, a+A, a+2A, ...: every device holds a share of each.
                def split(x):
                    b = x.shape[0] // grad_accum
                    return x.reshape(b, grad_accum, *x.shape[1:]).swapaxes(0, 1)
                micro = {k: split(v) for k, v in batch.items()}

                def body(acc, xs):
                    mb, a = xs
                    mb = {k: parallel.constrain(v, ("batch", "length")) for k, v in mb.items()}
                    (s, (n_, c_)), g = grad_fn(params, mb, frozen, None if key is None else jax.random.fold_in(key, a))
                    return jax.tree.map(jnp.add, acc, (s, n_, c_, g)), None

                zeros = jax.tree.map(jnp.zeros_like, params)
                init = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), zeros)
                (loss_sum, n, correct, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
            denom = jnp.maximum(n, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)

            def update(opt_state):
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            if nonfinite == "skip":  # a NaN update would spread to every parameter and moment: keep them
                new_params, opt_state = jax.lax.cond(finite, update, lambda o: (params, o), state["opt_state"])
            else:
                new_params, opt_state = update(state["opt_state"])
            new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
            metrics = {"loss": loss_sum / denom, "accuracy": correct / denom, "trained_tokens": n,
                       "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}
            return new_state, metrics

    in_shardings = (state_shardings, parallel.batch_sharding(mesh))
    if frozen_shardings is not None:
        in_shardings += (frozen_shardings,)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, None), donate_argnums=0)


def check_batch_bounds(step: int, local: dict, max_segment_len: int, max_trained: int) -> None:
    """Raises DataError (a bug in jaxsft) where the batch of `step` breaks a bound its compiled step
    relies on: the longest example and the most trained targets of a row the prepared data reported."""
    longest = longest_segment(local["segment_ids"])
    if longest > max_segment_len:
        raise DataError(f"step {step}: a packed row holds an example of {longest} tokens, longer than the longest "
                        f"({max_segment_len}) that the prepared data reported; this is a bug in jaxsft")
    trained = most_trained(local["loss_mask"])
    if trained > max_trained:
        raise DataError(f"step {step}: a packed row holds {trained} trained targets, more than the most ({max_trained}) "
                        f"that the prepared data allows; this is a bug in jaxsft")


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array of `tree` is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _check_nonfinite(step: int, metrics: dict, nonfinite: str) -> bool:
    """Applies `train.nonfinite` to step `step`: a non-finite loss or gradient norm raises
    `NonFiniteError` with `stop`, and is reported with `skip`. Returns whether the step updated
    the parameters (False: skipped)."""
    if bool(metrics["finite"]):
        return True
    values = f"loss {float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}"
    if nonfinite == "stop":
        raise NonFiniteError(f"step {step}: {values}. The run stops and does not save this step; its newest "
                             f"checkpoint is from before it. Check the data or lower optimizer.lr, or set "
                             f"train.nonfinite=skip to skip such updates.")
    info(f"step {step}: {values}; its update was skipped (train.nonfinite=skip)")
    return False


def _prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Writes `config.yaml` and the `hf/` side files; each file is replaced whole (never half-written)."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_yaml(cfg))
    hf_copy = run_dir / "hf"
    hf_copy.mkdir(exist_ok=True)
    for name in rundir.HF_SIDE_FILES:
        src = Path(cfg.model.path) / name
        if src.is_file():
            tmp = hf_copy / f".{name}.tmp-{os.getpid()}"
            try:
                shutil.copy2(src, tmp)
                os.replace(tmp, hf_copy / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


def check_run_dir_writable(run_dir: Path) -> None:
    """Fails early, before anything is loaded or written, when `run.dir` cannot be written: a
    read-only file system or directory, or a path through a file. Leaves no trace (an unnamed
    temporary file)."""
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"config key 'run.dir' ({run_dir}): {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"config key 'run.dir' ({run_dir}): cannot write in {existing} ({e.strerror})") from None


def model_args(hf_config: dict, cfg: Config):
    """The `ModelArgs` a run of `cfg` builds from this `config.json` content."""
    return args_from_hf_config(hf_config, param_dtype=DTYPES[cfg.model.param_dtype],
                               compute_dtype=DTYPES[cfg.model.compute_dtype], remat=cfg.model.remat,
                               scan_layers=cfg.model.scan_layers)


def check_model(cfg: Config):
    """`(hf_config, ModelArgs)` of `model.path`, read before anything heavier (the tokenizer, the
    weights), so a missing or unsupported model is the first error reported."""
    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is not set (a Hugging Face model directory)")
    hf = read_hf_config(cfg.model.path)
    try:
        args = model_args(hf, cfg)
    except ModelError as e:
        raise ModelError(f"{cfg.model.path}: {e}") from None
    return hf, args


def check_same_model(ckpt: Checkpointer, step: int, params: Any, cfg: Config, run_dir: Path) -> None:
    """Refuses to resume a run directory whose checkpoint holds another model's parameters, naming
    both, before anything in it is touched."""
    saved = SavedArrays(ckpt.step_dir(step)).tree.get("params", {})
    saved_shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if saved_shapes == shapes:
        return
    saved_model = ((ckpt.read_config(step) or {}).get("model") or {}).get("path", "?")
    differ = sorted(set(saved_shapes) ^ set(shapes)) or [k for k in shapes if shapes[k] != saved_shapes[k]]
    key = differ[0]
    detail = (f"parameter {key}: {list(saved_shapes[key]) if key in saved_shapes else 'absent'} in the checkpoint, "
              f"{list(shapes[key]) if key in shapes else 'absent'} in model.path")
    raise ModelError(f"{run_dir}: its checkpoint {ckpt.step_dir(step)} holds another model ({saved_model}) than "
                     f"model.path ({cfg.model.path}): {detail}. Use a new run.dir, or the model it was trained from.")


def _plot(run_dir: Path) -> None:
    """Draws the run's curves; a failure to draw is reported, never fatal to the run."""
    from jaxsft.plot import plot_run

    try:
        info(f"plot: {plot_run(run_dir)}")
    except (JaxsftError, OSError, ValueError) as e:
        if is_disk_full(e):  # the run's other files would not fit either: stop with the one line
            raise disk_full(getattr(e, "filename", None) or run_dir / "metrics.png", "plot") from None
        info(f"plot: not drawn ({e})")


def train(cfg: Config, devices: list | None = None, force_resume: bool = False) -> dict:
    """Runs (or resumes) the training run described by `cfg`; returns the last logged metrics.

    Holds `run.dir`'s lock throughout (a second run on it is refused, see `jaxsft.rundir`); refuses
    to resume with other data, model, seq_len or batch size unless `force_resume` (the change is
    then recorded in `config_history.yaml`); does nothing when the run already has `train.steps`
    steps. SIGTERM or SIGINT in the loop saves at the next step boundary and stops (after SIGINT by
    raising `Interrupted`); before the loop either raises `Interrupted` at once (see
    `checkpoint.Preemption`). However it stops, the checkpointer is closed and the lock released.
    """
    with Preemption() as preemption, contextlib.ExitStack() as run:
        return _train(cfg, devices, force_resume, preemption, run)


def _train(cfg: Config, devices: list | None, force_resume: bool, preemption: Preemption,
           run: contextlib.ExitStack) -> dict:
    """`train`'s body: what it opens goes on `run`, closed however it ends."""
    run_dir = Path(cfg.run.dir)
    hf_config, _ = check_model(cfg)
    if cfg.optimizer.lr == 0:  # allowed (a measurement run), but rarely meant
        info("warning: optimizer.lr is 0: the steps run but the weights will not change")
    if cfg.run.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"config key 'run.wandb_project' is {cfg.run.wandb_project!r}, but the wandb package is "
                          f"not installed (pip install 'jaxsft[wandb]'), or unset the key")
    at_step = rundir.done_step(run_dir)
    if at_step and at_step >= cfg.train.steps:
        info(f"run.dir {run_dir} is at step {at_step}; train.steps={cfg.train.steps} asks for no more: nothing to do")
        return {}
    if jax.process_index() == 0:
        check_run_dir_writable(run_dir)
        run.enter_context(rundir.RunLock(run_dir))  # before the checkpointer cleans up, or anything is written
    mesh, dp = parallel.checked_mesh(cfg.mesh, cfg.train.batch_size, cfg.train.grad_accum, devices)
    for line in parallel.check_unsplit(nnx.state(abstract_model(model_args(hf_config, cfg))), mesh, cfg.mesh.strict):
        info(line)
    local_batch = process_batch(cfg.train.batch_size, jax.process_count())
    tokenizer = load_tokenizer(cfg.model.path)

    frozen = None  # LoRA: the frozen base; the state's params are then the adapters
    if lora.enabled(cfg.lora):
        args, graphdef, state, frozen, tx, schedule = init_lora_state(cfg, mesh)
    else:
        model, graphdef, state, tx, schedule = init_state(cfg.model, cfg.optimizer, cfg.train.steps, mesh)
        args = model.args
    base_args = () if frozen is None else (frozen,)  # the extra argument of LoRA's steps
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    n_params = lora.count(state["params"]) + (lora.count(frozen) if frozen is not None else 0)
    step_flops = flops.train_flops_per_position(state["params"], args, cfg.data.seq_len, frozen) * (
        cfg.train.batch_size * cfg.data.seq_len)
    peak = flops.peak_flops(list(mesh.devices.flat), cfg.model.compute_dtype, cfg.train.peak_tflops)

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    run.callback(ckpt.close)  # whatever fails below: Orbax's threads left open print a traceback at exit
    start = ckpt.latest_step() or 0
    # data.shards=0: one shard per process, or, resuming, as many as the checkpoint was saved with.
    shards = cfg.data.shards or (start and ckpt.data_shards(start)) or jax.process_count()
    check_shards(shards, cfg.train.batch_size, jax.process_count())
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards))
    data_iter = train_batches(cfg.data, tokenizer, seed=cfg.train.seed, global_batch=cfg.train.batch_size,
                              shards=shards, process_index=jax.process_index(), process_count=jax.process_count())
    eval_data = None
    if cfg.data.eval:  # read before anything is written: a bad held-out file changes nothing
        eval_data = eval_batches(cfg.data, tokenizer, local_batch=local_batch, process_index=jax.process_index(),
                                 process_count=jax.process_count(), max_batches=cfg.train.eval_batches)
    # The longest example and the most trained targets of a row on any process: attention skips
    # keys further back, the loss reads only that many positions per row (the same compiled step
    # everywhere), and each batch is checked against both before its step.
    max_segment_len = parallel.global_max(data_iter.longest)
    max_trained = parallel.global_max(data_iter.most_trained)
    spec = StepSpec.of(cfg, mesh.devices.flat[0].platform, max_segment_len, max_trained)
    if frozen is not None:  # before anything is restored: a resume must find the base its adapters know
        lora.check_base(run_dir, cfg, resuming=bool(start))
    if start:
        check_same_model(ckpt, start, state["params"], cfg, run_dir)
        changes = rundir.check_resume(run_dir, rundir.saved_config(run_dir) or ckpt.read_config(start), cfg, start,
                                      force_resume)
        if changes and jax.process_index() == 0:
            history = rundir.record_history(run_dir, start, changes)
            info(f"resuming with changed {', '.join(changes)} (--force-resume); recorded in {history}")
    _prepare_run_dir(cfg, run_dir)
    if start:
        target = abstract_like(state)
        jax.tree.map(lambda x: x.delete(), state)  # the restored state replaces the weights just loaded: never hold both
        state, data_iter = ckpt.restore(start, target, data_iter)
        info(f"resumed from {run_dir / 'checkpoints' / str(start)}")
    # From scratch (no complete checkpoint), drop every line of a run that died, its step-0 evaluation too.
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if start else -1, total_steps=cfg.train.steps,
                     tensorboard=cfg.run.tensorboard, wandb_project=cfg.run.wandb_project, config=to_dict(cfg),
                     progress=cfg.run.progress)
    run.callback(log.close)
    memory = memory_estimate(state["params"], state["opt_state"], args,
                             cfg.train.batch_size // (dp * cfg.train.grad_accum), cfg.data.seq_len,
                             jnp.dtype(DTYPES[cfg.model.compute_dtype]).itemsize, cfg.model.remat)
    for line in summary_lines(model_path=cfg.model.path, model_type=hf_config.get("model_type", "?"),
                              n_params=n_params, mesh=dict(mesh.shape), global_batch=cfg.train.batch_size,
                              seq_len=cfg.data.seq_len, grad_accum=cfg.train.grad_accum,
                              steps=(start, cfg.train.steps), memory=memory, run_dir=run_dir,
                              param_dtype=cfg.model.param_dtype if frozen is None else cfg.lora.base_dtype):
        info(line)
    if frozen is not None:
        info(lora.summary_line(state["params"], frozen, cfg.lora))
    if peak:
        info(f"MFU counts {step_flops / 1e12:.3g} TFLOP per step against a peak of {peak / 1e12:.3g} TFLOP/s"
             + (" (measured CPU matmul)" if mesh.devices.flat[0].platform == "cpu" and not cfg.train.peak_tflops else ""))

    base_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    step_fn = make_train_step(graphdef, tx, schedule, mesh, state_shardings, spec, base_shardings, cfg.train.seed)
    # Compiled ahead of the loop, exactly as `--dry-run` and `jaxsft compile` compile it (same
    # spec, same program fingerprint).
    lowered = step_fn.lower(state, parallel.abstract_batch(cfg.train.batch_size, cfg.data.seq_len, mesh), *base_args)
    t_compile = time.perf_counter()
    step_fn = lowered.compile()
    info(step_line(spec, lowered, step_fn, time.perf_counter() - t_compile))
    eval_fn = None
    generate_fn = evalgen.make(cfg, tokenizer, mesh)  # train.eval_generate_every; None when off

    def generation_metrics() -> dict:
        """`eval_<metric>` of greedy generations by the model as the loop holds it now."""
        params = state["params"] if frozen is None else lora.combine(frozen, state["params"])
        return generate_fn(nnx.merge(graphdef, params))

    if eval_data is not None:
        eval_fn = make_eval_step(graphdef, mesh, state_shardings["params"], eval_spec(cfg, mesh, eval_data),
                                 base_shardings)
        # Put on the devices once: the same held-out batches serve every evaluation.
        eval_data = [parallel.global_batch(b, mesh) for b in eval_data]
        if start == 0:
            log.write({"step": 0, "eval_loss": held_out_loss(eval_fn, state["params"], eval_data, *base_args)}
                      | (generation_metrics() if generate_fn else {}))

    last: dict = {}
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    t0, steps_since = time.perf_counter(), 0
    skipped, unchecked, preempted = 0, None, False
    try:
        with preemption.armed(ckpt):
            for step in range(start, cfg.train.steps):
                local = next(data_iter)
                check_batch_bounds(step + 1, local, max_segment_len, max_trained)
                state, metrics = step_fn(state, parallel.global_batch(local, mesh), *base_args)
                steps_since += 1
                done = step + 1
                is_last = done == cfg.train.steps
                # The previous step is done (or nearly) by now: checking it does not stall the one just started.
                if unchecked is not None:
                    skipped += not _check_nonfinite(*unchecked, cfg.train.nonfinite)
                unchecked = (done, metrics)
                preempted = preemption.reached(done)
                log_now = done % cfg.train.log_every == 0 or is_last
                eval_now = eval_fn is not None and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or is_last)
                generate_now = generate_fn is not None and (done % cfg.train.eval_generate_every == 0 or is_last)
                # checkpoint.keep_best: every evaluated step is saved with its eval_loss, so the best can be kept.
                save_now = done % cfg.checkpoint.every == 0 or is_last or preempted or (eval_now and cfg.checkpoint.keep_best)
                # A save that failed in the background (a full disk) stops the run before this step
                # is logged; before a save, wait for the one in flight to know.
                ckpt.check(wait=save_now)
                if log_now or save_now:
                    skipped += not _check_nonfinite(done, metrics, cfg.train.nonfinite)
                    unchecked = None
                record = None
                if log_now:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                    elapsed = time.perf_counter() - t0
                    step_s = elapsed / steps_since
                    record = {"step": done, "total_steps": cfg.train.steps, **metrics,
                              "trained_tokens": int(metrics["trained_tokens"]),
                              "tokens_per_s": tokens_per_step / step_s, "step_s": step_s}
                    if peak:
                        record["mfu"] = step_flops / step_s / peak
                    if skipped:
                        record["skipped_steps"] = skipped
                if eval_now:
                    record = (record or {"step": done}) | {"eval_loss": held_out_loss(eval_fn, state["params"], eval_data, *base_args)}
                if generate_now:
                    record = (record or {"step": done}) | generation_metrics()
                if record is not None:
                    log.write(record)
                    last = record
                    t0, steps_since = time.perf_counter(), 0
                if save_now:
                    if not all_finite(state["params"]):
                        raise NonFiniteError(f"step {done}: the parameters hold NaN or infinite values although "
                                             f"the loss and gradient norm are finite; not saving them. Lower "
                                             f"optimizer.lr or check the model at model.path.")
                    ckpt.save(done, state, data_iter, config=to_dict(cfg),
                              metrics={"eval_loss": record["eval_loss"]} if eval_now else None)
                if preempted:
                    saved = f"saved step {done} in {ckpt.step_dir(done)}; run the same command to resume"
                    if preemption.signalled != signal.SIGINT:  # SIGTERM, or the preemption service
                        info(f"preempted (SIGTERM): {saved}")
                    break
    finally:
        ckpt.close()  # a save in flight completes even when the loop raised
        log.close()
    if cfg.run.plot and jax.process_index() == 0:
        _plot(run_dir)
    if preempted and preemption.signalled == signal.SIGINT:
        raise Interrupted(f"interrupted (SIGINT): {saved}", signal.SIGINT)
    if cfg.run.export and not preempted:
        from jaxsft.export import export

        info(f"exported {export(run_dir, cfg.run.export)}")
    return last

