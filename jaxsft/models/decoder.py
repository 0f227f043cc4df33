"""The decoder-only transformer, in Flax NNX, with Hugging Face parameter names.

Dimension legend used in every einsum below:
  B batch, T query length, S key length, D model width, N query heads, K key/value heads,
  G query heads per kv head (N = K * G), H head dim, F mlp width, V vocab, L layers.

Parameters carry logical axis names (`axes=` metadata) and never mesh axis names; the layers are
stored stacked (a leading `layers` axis) and applied with `jax.lax.scan`, so compile time does
not grow with depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft.parallel import constrain


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Architecture of one model, read from its Hugging Face `config.json` (see `from_hf_config`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # llama3 frequency scaling, as sorted items
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    remat: str = "none"  # none | full | dots


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init: str = "normal") -> nnx.Param:
    """A parameter with its logical axes; random init (weights are normally loaded over it)."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class Linear(nnx.Module):
    """`y = einsum(spec, x, kernel) (+ bias)`; the kernel shape is written out by the caller."""

    def __init__(self, spec: str, shape: tuple[int, ...], axes: tuple[str, ...], *, bias_shape=None,
                 bias_axes=None, dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.kernel = _param(rngs, shape, axes, dtype)
        self.bias = _param(rngs, bias_shape, bias_axes, dtype, "zeros") if bias_shape else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.spec, x, self.kernel[...].astype(x.dtype))
        return y + self.bias[...].astype(x.dtype) if self.bias is not None else y


class RMSNorm(nnx.Module):
    """`x / rms(x) * weight`, computed in float32 as Hugging Face does."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[str, ...], eps: float, *, dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, shape, axes, dtype, "ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * x32).astype(x.dtype)


def rope_frequencies(args: ModelArgs) -> jax.Array:
    """Inverse frequencies `[H/2]`, with Llama 3 scaling when the config asks for it."""
    h = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if args.rope_scaling is None:
        return inv_freq
    s = dict(args.rope_scaling)
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * jnp.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in Hugging Face's half-split layout. x: [B,T,*,H]; cos, sin: [B,T,H]."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention over packed rows (a token sees only earlier tokens of its segment)."""

    def __init__(self, args: ModelArgs, lead: tuple[int, ...], lead_axes: tuple[str, ...], *, rngs: nnx.Rngs):
        d, n, k, h, dt = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, args.param_dtype
        bias = args.attention_bias
        self.q_proj = Linear("BTD,DNH->BTNH", lead + (d, n, h), lead_axes + ("embed", "heads", "head_dim"),
                             bias_shape=lead + (n, h) if bias else None, bias_axes=lead_axes + ("heads", "head_dim"),
                             dtype=dt, rngs=rngs)
        self.k_proj = Linear("BTD,DKH->BTKH", lead + (d, k, h), lead_axes + ("embed", "kv_heads", "head_dim"),
                             bias_shape=lead + (k, h) if bias else None, bias_axes=lead_axes + ("kv_heads", "head_dim"),
                             dtype=dt, rngs=rngs)
        self.v_proj = Linear("BTD,DKH->BTKH", lead + (d, k, h), lead_axes + ("embed", "kv_heads", "head_dim"),
                             bias_shape=lead + (k, h) if bias else None, bias_axes=lead_axes + ("kv_heads", "head_dim"),
                             dtype=dt, rngs=rngs)
        self.o_proj = Linear("BTNH,NHD->BTD", lead + (n, h, d), lead_axes + ("heads", "head_dim", "embed"),
                             bias_shape=lead + (d,) if bias else None, bias_axes=lead_axes + ("embed",),
                             dtype=dt, rngs=rngs)
        self.num_kv_heads = k

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        q = apply_rope(self.q_proj(x), cos, sin)
        k = apply_rope(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        b, t, n, h = q.shape
        q = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * h**-0.5
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
        return self.o_proj(out)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, args: ModelArgs, lead: tuple[int, ...], lead_axes: tuple[str, ...], *, rngs: nnx.Rngs):
        d, f, dt = args.hidden_size, args.intermediate_size, args.param_dtype
        b = args.mlp_bias
        self.gate_proj = Linear("BTD,DF->BTF", lead + (d, f), lead_axes + ("embed", "mlp"),
                                bias_shape=lead + (f,) if b else None, bias_axes=lead_axes + ("mlp",), dtype=dt, rngs=rngs)
        self.up_proj = Linear("BTD,DF->BTF", lead + (d, f), lead_axes + ("embed", "mlp"),
                              bias_shape=lead + (f,) if b else None, bias_axes=lead_axes + ("mlp",), dtype=dt, rngs=rngs)
        self.down_proj = Linear("BTF,FD->BTD", lead + (f, d), lead_axes + ("mlp", "embed"),
                                bias_shape=lead + (d,) if b else None, bias_axes=lead_axes + ("embed",), dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block; built with `lead=(L,)` it holds all L layers stacked."""

    def __init__(self, args: ModelArgs, lead: tuple[int, ...] = (), lead_axes: tuple[str, ...] = (), *, rngs: nnx.Rngs):
        d, dt = args.hidden_size, args.param_dtype
        self.input_layernorm = RMSNorm(lead + (d,), lead_axes + ("norm",), args.rms_norm_eps, dtype=dt, rngs=rngs)
        self.self_attn = Attention(args, lead, lead_axes, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(lead + (d,), lead_axes + ("norm",), args.rms_norm_eps, dtype=dt, rngs=rngs)
        self.mlp = MLP(args, lead, lead_axes, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed"))


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class Embedding(nnx.Module):
    """Token embedding table `[V, D]`."""

    def __init__(self, args: ModelArgs, *, rngs: nnx.Rngs):
        self.weight = _param(rngs, (args.vocab_size, args.hidden_size), ("vocab", "embed"), args.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)


class DecoderModel(nnx.Module):
    """Embedding -> scanned decoder layers -> final norm (Hugging Face's `model.*`)."""

    def __init__(self, args: ModelArgs, *, rngs: nnx.Rngs):
        self.args = args
        self.embed_tokens = Embedding(args, rngs=rngs)
        self.layers = DecoderLayer(args, (args.num_layers,), ("layers",), rngs=rngs)
        self.norm = RMSNorm((args.hidden_size,), ("norm",), args.rms_norm_eps, dtype=args.param_dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        args = self.args
        x = self.embed_tokens(tokens).astype(args.compute_dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        # Rotary tables and the mask are shared by all layers: computed once, outside the scan.
        freqs = positions[..., None].astype(jnp.float32) * rope_frequencies(args)  # [B,T,H/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        causal = positions[:, :, None] >= positions[:, None, :]  # within a segment positions increase
        same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = (causal & same_segment)[:, None, None, :, :]  # [B,1,1,T,S]

        graphdef, stacked = nnx.split(self.layers)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, cos, sin, mask), None

        if args.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[args.remat], prevent_cse=False)
        x, _ = jax.lax.scan(body, x, stacked)
        return self.norm(x)


class CausalLM(nnx.Module):
    """Decoder plus LM head (Hugging Face's `*ForCausalLM`); returns float32 logits `[B, T, V]`."""

    def __init__(self, args: ModelArgs, *, rngs: nnx.Rngs):
        self.args = args
        self.model = DecoderModel(args, rngs=rngs)
        if not args.tie_word_embeddings:
            self.lm_head = Linear("BTD,DV->BTV", (args.hidden_size, args.vocab_size), ("embed", "vocab"),
                                  dtype=args.param_dtype, rngs=rngs)

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states `[B, T, D]` (the loss applies the head itself, in chunks)."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        return self.model(tokens, positions, segment_ids)

    def head_kernel(self) -> jax.Array:
        """The `[D, V]` output projection (the embedding, transposed, when tied)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.weight[...].T
        return self.lm_head.kernel[...]

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        x = self.hidden_states(tokens, positions, segment_ids)
        return jnp.einsum("BTD,DV->BTV", x, self.head_kernel().astype(x.dtype),
                          preferred_element_type=jnp.float32)
