"""Model families: what each Hugging Face `model_type` changes in the shared decoder, as data.

`config.json` is first read by transformers' own config class for its `model_type` (a built-in
class, never remote code), so defaults the file leaves out, legacy keys (`rope_theta`,
`rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) and derived fields
(`layer_types`) mean exactly what they mean to Hugging Face. `args_from_hf_config` then turns
that config and the family's `Family` switches into the `ModelArgs` of the one decoder.

Per-layer settings follow `layer_types`: a `sliding_attention` layer attends to the last
`sliding_window` tokens (itself included, as Hugging Face's `kv_idx > q_idx - sliding_window`)
with the RoPE parameters of that layer type (Gemma 3: a local base); a config without
`layer_types` slides in every layer when it sets `sliding_window` (Mistral).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxsft.errors import ModelError
from jaxsft.models.decoder import ModelArgs, Rope


@dataclasses.dataclass(frozen=True)
class Family:
    """What a family's modeling code does that its config.json does not say."""

    gemma_norms: bool = False  # RMSNorm scales by (1 + weight), embeddings are scaled by sqrt(hidden)
    sandwich_norms: bool = False  # norms after attention and after the MLP too
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys
    qkv_bias: bool | None = None  # q/k/v biases; None: the config's `attention_bias` (then o_proj's too)
    activation_key: str = "hidden_act"  # the config field naming the MLP activation
    attn_softcap: bool = True  # False: `attn_logit_softcapping` is ignored (Hugging Face's Gemma 3 code)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
    "gemma": Family(gemma_norms=True),
    "gemma2": Family(gemma_norms=True, sandwich_norms=True, activation_key="hidden_activation"),
    "gemma3_text": Family(gemma_norms=True, sandwich_norms=True, qk_norm=True, activation_key="hidden_activation",
                          attn_softcap=False),
}

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_LAYER_TYPES = ("full_attention", "sliding_attention")


def hf_config_object(hf: dict) -> Any:
    """The transformers config object for a `config.json` dict of a supported family."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(f"config.json has model_type {model_type!r}, which jaxsft does not support; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    from transformers import AutoConfig  # only the built-in class of a listed type: no remote code

    try:
        return AutoConfig.for_model(**hf)
    except Exception as e:  # noqa: BLE001 - transformers' validation errors vary (TypeError, ValueError, hub's own)
        reason = " ".join(str(e).split())  # one paragraph
        raise ModelError(f"config.json is not a valid {model_type} config for transformers: {reason}") from None


def _rope(params: dict) -> Rope:
    """One layer type's RoPE from its (standardized) `rope_parameters`."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ModelError(f"config.json asks for RoPE type {kind!r}; jaxsft supports default, linear and llama3")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError("config.json sets partial_rotary_factor; jaxsft rotates the whole head dimension only")
    if kind == "default":
        return Rope(theta=float(params["rope_theta"]))
    if kind == "linear":
        return Rope(theta=float(params["rope_theta"]), scaling="linear", factor=float(params["factor"]))
    return Rope(theta=float(params["rope_theta"]), scaling="llama3", factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def _layer_settings(cfg: Any) -> tuple[tuple[Rope, ...], tuple[int, ...]]:
    """Per-layer RoPE and attention window (0: the whole causal context)."""
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or 0
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:  # Mistral: the window, when set, applies to every layer
        layer_types = ["sliding_attention" if window else "full_attention"] * n
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise ModelError(f"config.json has layer_types {unknown}; jaxsft supports {', '.join(_LAYER_TYPES)}")
    if "sliding_attention" in layer_types and not window:
        raise ModelError("config.json has sliding_attention layers but no sliding_window")
    rope = dict(cfg.rope_parameters or {})
    per_type = set(rope) <= set(_LAYER_TYPES) and bool(rope)  # Gemma 3: one set of RoPE parameters per layer type
    ropes = tuple(_rope(rope[t] if per_type else rope) for t in layer_types)
    windows = tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    return ropes, windows


def args_from_hf_config(hf: dict, *, param_dtype: Any = jnp.float32, compute_dtype: Any = None,
                        remat: str = "none", scan_layers: bool = True) -> ModelArgs:
    """ModelArgs for a Hugging Face `config.json` dict; unsupported families fail with the list of supported ones."""
    cfg = hf_config_object(hf)
    family = FAMILIES[cfg.model_type]
    if getattr(cfg, "use_bidirectional_attention", None):
        raise ModelError("config.json sets use_bidirectional_attention; jaxsft trains causal language models only")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    activation = getattr(cfg, family.activation_key)
    if activation not in _ACTIVATIONS:
        raise ModelError(f"config.json has {family.activation_key} {activation!r}; jaxsft supports "
                         f"{', '.join(_ACTIVATIONS)}")
    ropes, windows = _layer_settings(cfg)
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    return ModelArgs(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.rms_norm_eps),
        layer_ropes=ropes,
        layer_windows=windows,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
        o_bias=attention_bias if family.qkv_bias is None else False,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        activation=_ACTIVATIONS[activation],
        norm_offset=1.0 if family.gemma_norms else 0.0,
        embed_scale=cfg.hidden_size**0.5 if family.gemma_norms else 1.0,
        qk_norm=family.qk_norm,
        sandwich_norms=family.sandwich_norms,
        attn_scale=float(scalar) ** -0.5 if scalar else None,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None) if family.attn_softcap else None,
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype or param_dtype,
        remat=remat,
        scan_layers=scan_layers,
    )
