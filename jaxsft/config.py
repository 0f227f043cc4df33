"""Run configuration: frozen nested dataclasses loaded from YAML with `section.key=value` overrides.

Every key is validated once, at start: an unknown key, a wrong type or a value outside its allowed
set raises `ConfigError` naming the dotted key. Each component later receives only its own
sub-config (`cfg.data`, `cfg.optimizer`, ...), never the whole run config.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxsft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which Hugging Face model to fine-tune and how to hold it."""

    path: str = ""  # Hugging Face model directory (config.json, *.safetensors, tokenizer files)
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    # true: the layers run as one lax.scan (compile time flat in depth; what large models want);
    # false: unrolled, no stacked buffers for the saved activations (faster steps for shallow
    # models on the CPU; compile time grows with depth)
    scan_layers: bool = True
    # how attention runs (jaxsft/models/attention.py): auto = splash on TPU, gpu on GPU, blocked
    # on CPU; reference = plain einsum + softmax (any platform; memory grows with seq_len^2)
    attention: Literal["auto", "reference", "blocked", "splash", "gpu"] = "auto"


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA / QLoRA (off unless `rank` > 0): low-rank adapters `W + B A * alpha/rank` on the chosen
    projections are the only trained parameters; the base stays frozen (and, with `base_quant`,
    quantized), is never saved, and is read from `model.path` again on resume."""

    rank: int = 0
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input (training only)
    targets: tuple[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ...] = (
        LORA_TARGETS)
    base_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # how the frozen base is held
    # QLoRA: the frozen projections stored quantized (per-block scales, qwix), dequantized in the
    # compute dtype inside each matmul
    base_quant: Literal["none", "int8", "nf4"] = "none"
    quant_block: int = 64  # input-dimension elements per quantization scale
    init_from: str = ""  # a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to start from


@dataclasses.dataclass(frozen=True)
class FieldsConfig:
    """Which record field holds what, for datasets that name them differently.

    Alpaca: `prompt: instruction, input: input, completion: output`; ShareGPT:
    `messages: conversations, role: from, content: value` (roles human/gpt are understood).
    """

    prompt: str = "prompt"
    completion: str = "completion"
    input: str = ""  # optional second prompt field (Alpaca's `input`), appended after a blank line
    system: str = "system"  # optional system prompt of a prompt/completion record
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    tools: str = "tools"  # tool definitions passed to the chat template
    text: str = "text"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they become packed rows."""

    # Files, globs or Hugging Face `save_to_disk` directories: JSONL (.jsonl, .jsonl.gz) or Parquet.
    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()  # optional held-out data, same forms
    weights: tuple[float, ...] = ()  # one per data.train entry: a weighted mixture; empty: one concatenated set
    schema: Literal["auto", "prompt_completion", "messages", "text"] = "auto"  # auto: by the fields present
    fields: FieldsConfig = FieldsConfig()
    # Record fields meant to be left out (ids, metadata): with a data.fields mapping set, any other
    # field that no mapping reads is an error naming it, since its text would silently not be trained.
    ignore_fields: tuple[str, ...] = ()
    train_on_prompt: bool = False  # train every token, not only completions / assistant turns
    empty: Literal["error", "drop"] = "error"  # an example with no trained tokens
    seq_len: int = 512
    # Examples longer than seq_len: drop them; truncate: keep the trained turns that fit whole (a
    # conversation cut after its last whole assistant turn, text cut at seq_len), else drop;
    # truncate_prompt: also cut the prompt from the left (after bos / the system message) so the
    # last completion fits whole, else drop. No completion is ever trained without its end.
    overlong: Literal["drop", "truncate", "truncate_prompt"] = "drop"
    # Disjoint record shards, each ordered and packed on its own; the global batch takes an equal
    # block of rows from each. 0: one per process (a resumed run keeps its checkpoint's count).
    # The same count gives the same batches on any number of processes.
    shards: int = 0
    packing_bins: int = 256  # rows per best-fit packing window (larger: tighter packing, later first batch)
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: how long, how big a batch, how often to log and evaluate."""

    steps: int = 100
    batch_size: int = 8  # global, in packed rows
    grad_accum: int = 1  # micro-batches per step; the loss is normalized over all of them
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the start and the end (when data.eval is set)
    eval_batches: int = 0  # 0: the whole held-out set
    loss_chunk: int = 256  # positions per chunk of the [B, T, V] logits in the loss; 0: whole logits at once
    loss_whole_mib: int = 64  # float32 logits of a micro-batch up to this size: computed whole, kept (no chunks)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: datasheet table (accelerators) or measured (CPU)
    # A non-finite loss or gradient norm: stop the run (no checkpoint of it is written), or skip that
    # step's update (parameters and optimizer state stay as they were; the data moves on).
    nonfinite: Literal["stop", "skip"] = "stop"
    # Every this many steps (and at the last), also generate for the first `eval_generate_prompts`
    # held-out prompts and log the `eval.metrics` (exact match, JSON validity, ...); 0: never.
    eval_generate_every: int = 0
    eval_generate_prompts: int = 32


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and a decay schedule, optax throughout."""

    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 turns it off
    # Weight decay applies to projection kernels only; true also decays norms, biases and embeddings.
    decay_norms_biases_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 fills with the devices the others leave. How parameters and
    activations map onto it: `jaxsft.parallel.RULES`, with `rules` merged over it."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # logical axis -> the mesh axes it is split over (null: replicated), over jaxsft.parallel.RULES;
    # e.g. `{heads: null, kv_heads: null}`, `{mlp: [fsdp]}`
    rules: dict[str, tuple[str, ...] | None] = dataclasses.field(default_factory=dict)
    # a parameter a rule wants split over a mesh axis of size > 1 that does not divide it is then
    # an error at start, not a warning (it would be replicated along that axis)
    strict: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in the run directory (saved asynchronously; SIGTERM also saves, then stops)."""

    every: int = 100  # save every this many steps, and at the last step
    keep: int = 3  # the newest checkpoints kept; older ones are deleted
    # Also keep the checkpoint with the lowest held-out loss, however old: every evaluated step
    # (train.eval_every) is then saved too, with its eval_loss.
    keep_best: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run writes (config, metrics, checkpoints) and how it reports."""

    dir: str = "runs/default"
    export: str = ""  # when set, `train` exports a Hugging Face directory here at the end
    tensorboard: bool = True  # TensorBoard event files in RUN_DIR/tensorboard
    plot: bool = True  # RUN_DIR/metrics.png (loss, learning rate, tokens/s) at the end of the run
    wandb_project: str = ""  # when set, also log to this Weights & Biases project (needs `wandb`)
    progress: Literal["auto", "bar", "lines"] = "auto"  # console: auto = a bar on a terminal, else lines


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """How to decode (`jaxsft generate KEY=VALUE ...`, and the generations of `jaxsft eval`)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # sample among the k most likely tokens; 0: no limit
    top_p: float = 1.0  # sample among the most likely tokens holding this much probability
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings, besides the eos and end-of-turn tokens
    batch_size: int = 8  # prompts decoded together


@dataclasses.dataclass(frozen=True)
class EvalConfig(GenerateConfig):
    """`jaxsft eval`: decoding settings (as `GenerateConfig`) and the generation metrics to report."""

    metrics: tuple[Literal["exact_match", "json_valid", "json_fields", "label_in_set"], ...] = ("exact_match",)
    labels: tuple[str, ...] = ()  # the allowed answers, for label_in_set
    user_metric: str = ""  # "pkg.module:function", called as function(prediction, reference) -> number
    num_generations: int = 64  # held-out prompts to generate for (the first ones); 0: all
    examples: int = 5  # example generations shown in the report
    # Also prompt the base model with this many data.train examples before each prompt (k-shot);
    # `--few-shot K` on the command line.
    few_shot: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    lora: LoraConfig = LoraConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting only where lossless."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin is tuple:  # tuple[str, ...]: accept one string or a list of strings
        (item_tp, _) = typing.get_args(tp)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a string or a list of strings, got {value!r}")
        return tuple(_coerce(v, item_tp, key) for v in items)
    if origin is dict:  # dict[str, V]: a mapping, each value checked as V and named `key.name`
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' has the wrong type: {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}' must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, naming the dotted key of any mistake."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'; known keys{' in ' + prefix if prefix else ''}: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turns `["train.steps=10", "data.train=[a.jsonl,b.jsonl]"]` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, text = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(text) if text else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Loads a YAML config file (or none) and applies dotted overrides; validates every key."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:  # one line: the place and the problem
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    cfg = _build(Config, _merge(raw, parse_overrides(list(overrides))), "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks relations between keys that types alone cannot."""
    positive = {"data.seq_len": cfg.data.seq_len, "train.batch_size": cfg.train.batch_size,
                "train.grad_accum": cfg.train.grad_accum, "checkpoint.keep": cfg.checkpoint.keep,
                "checkpoint.every": cfg.checkpoint.every, "train.log_every": cfg.train.log_every,
                "data.packing_bins": cfg.data.packing_bins}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    if cfg.data.weights:
        if len(cfg.data.weights) != len(cfg.data.train):
            raise ConfigError(f"config key 'data.weights' has {len(cfg.data.weights)} weights for "
                              f"{len(cfg.data.train)} 'data.train' entries; give one per entry")
        if min(cfg.data.weights) <= 0:
            raise ConfigError(f"config key 'data.weights' must all be positive, got {list(cfg.data.weights)}")
    if cfg.optimizer.lr < 0:
        raise ConfigError(f"config key 'optimizer.lr' must be >= 0, got {cfg.optimizer.lr}")
    if cfg.train.steps < 0:
        raise ConfigError(f"config key 'train.steps' must be >= 0, got {cfg.train.steps}")
    for key, value in {"train.loss_chunk": cfg.train.loss_chunk, "train.loss_whole_mib": cfg.train.loss_whole_mib,
                       "train.peak_tflops": cfg.train.peak_tflops}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"config key 'train.batch_size' ({cfg.train.batch_size}) must be divisible by "
                          f"'train.grad_accum' ({cfg.train.grad_accum})")
    for axis in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, axis)
        if v == 0 or v < -1:
            raise ConfigError(f"config key 'mesh.{axis}' must be a positive size or -1, got {v}")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("at most one of 'mesh.data', 'mesh.fsdp', 'mesh.tensor' may be -1")
    if cfg.train.eval_generate_every < 0 or cfg.train.eval_generate_prompts <= 0:
        raise ConfigError("config keys 'train.eval_generate_every' must be >= 0 and 'train.eval_generate_prompts' "
                          f"positive, got {cfg.train.eval_generate_every} and {cfg.train.eval_generate_prompts}")
    lora = cfg.lora
    if lora.rank < 0:
        raise ConfigError(f"config key 'lora.rank' must be >= 0 (0: no LoRA), got {lora.rank}")
    if lora.rank and not lora.targets:
        raise ConfigError("config key 'lora.targets' is empty: name the projections to adapt")
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"config key 'lora.targets' names a projection twice: {list(lora.targets)}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {lora.dropout}")
    if lora.alpha <= 0 or lora.quant_block <= 0:
        raise ConfigError(f"config keys 'lora.alpha' and 'lora.quant_block' must be positive, got {lora.alpha} "
                          f"and {lora.quant_block}")
    if not lora.rank and (lora.base_quant != "none" or lora.init_from):
        raise ConfigError("config keys 'lora.base_quant' and 'lora.init_from' need LoRA: set 'lora.rank' > 0")
    validate_eval(cfg.eval)


def validate_generate(cfg: GenerateConfig, prefix: str = "") -> None:
    """Checks decoding settings; errors name the key under `prefix` (`eval.` in a run config)."""
    for key in ("max_new_tokens", "batch_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key '{prefix}{key}' must be positive, got {getattr(cfg, key)}")
    for key in ("temperature", "top_k"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key '{prefix}{key}' must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"config key '{prefix}top_p' must be in (0, 1], got {cfg.top_p}")
    if any(not s for s in cfg.stop):
        raise ConfigError(f"config key '{prefix}stop' holds an empty string")


def validate_eval(cfg: EvalConfig) -> None:
    """Checks the `eval` section."""
    validate_generate(cfg, "eval.")
    for key in ("num_generations", "examples", "few_shot"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key 'eval.{key}' must be >= 0, got {getattr(cfg, key)}")
    if "label_in_set" in cfg.metrics and not cfg.labels:
        raise ConfigError("config key 'eval.metrics' asks for label_in_set, but 'eval.labels' is empty")
    module, _, function = cfg.user_metric.partition(":")
    if cfg.user_metric and not (module and function):
        raise ConfigError(f"config key 'eval.user_metric' must look like 'pkg.module:function', got "
                          f"{cfg.user_metric!r}")


def generate_config(overrides: list[str] = ()) -> GenerateConfig:
    """Decoding settings from `key=value` overrides (`jaxsft generate`), validated."""
    cfg = _build(GenerateConfig, parse_overrides(list(overrides)), "")
    validate_generate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(cfg))


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, loadable again with `load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_config(cfg: Config, path: Path) -> None:
    """Writes `config_yaml(cfg)` to `path`."""
    path.write_text(config_yaml(cfg))
