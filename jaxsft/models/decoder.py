"""The decoder-only transformer, in Flax NNX, with Hugging Face parameter names.

One decoder serves every supported family; what differs between families (norm offset, biases,
q/k norms, sandwich norms, soft-caps, sliding windows, RoPE bases) arrives as plain values in
`ModelArgs` (built by `jaxsft.models.families`), never as a per-family code path.

Dimension legend used in every einsum below:
  B batch, T query length, S key length, D model width, N query heads, K key/value heads,
  G query heads per kv head (N = K * G), H head dim, F mlp width, V vocab, L layers.

Parameters carry logical axis names (`axes=` metadata) and never mesh axis names; the layers are
stored stacked (a leading `layers` axis) and applied with `jax.lax.scan`, so compile time does
not grow with depth. What differs from one layer to the next (its RoPE frequencies, and its kind
of attention: an index into the model's distinct windows) is scanned along with the weights as
per-layer arrays. Attention is described, not computed, here: an `AttentionSpec` (segment ids,
positions, window, soft-cap, scale, lookback) goes to `jaxsft.models.attention`, whose backend
(`reference`, CPU `blocked`, TPU `splash`, `gpu`) the caller chooses.

Generation reuses the same layers with a `KVCache` (keys and values of every layer stacked
`[L, B, S, K, H]`, carried through the layer scan and written in place): the same masks, windows,
soft-caps and RoPE apply, with the cache slots as keys (`CausalLM.decode`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft.models import attention, fused
from jaxsft.models.attention import AttentionSpec
from jaxsft.parallel import constrain


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding settings of one layer: the base and an optional frequency scaling."""

    theta: float = 10000.0
    scaling: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Architecture of one model (see `jaxsft.models.families.args_from_hf_config`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    layer_ropes: tuple[Rope, ...] = ()  # one per layer; empty: Rope() everywhere
    layer_windows: tuple[int, ...] = ()  # one per layer: attend to this many tokens (itself included); 0 = all
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # silu | gelu_tanh | gelu: the gate of the gated MLP
    norm_offset: float = 0.0  # Gemma: norms scale by (1 + weight)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on queries and keys, before RoPE
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP too
    attn_scale: float | None = None  # scores scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    remat: str = "none"  # none | full | dots
    scan_layers: bool = True  # one lax.scan over the layers; False: unrolled (see config.ModelConfig)
    # LoRA (jaxsft.lora): adapters of this rank on the `lora_targets` projections; 0: none
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()


class KVCache(NamedTuple):
    """Keys and values of every layer for generation (a pytree, so it goes through jit and loops).

    Slot s of row b holds the token at position `positions[b, s]`; -1 marks an empty or padding
    slot, which no query sees. Each call writes its T tokens at slots `index .. index + T - 1`.
    """

    k: jax.Array  # [L, B, S, K, H], after RoPE (and the k norm)
    v: jax.Array  # [L, B, S, K, H]
    positions: jax.Array  # [B, S] int32
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def empty(cls, args: "ModelArgs", batch: int, length: int) -> "KVCache":
        """A cache of `length` empty slots per row, in the compute dtype."""
        shape = (args.num_layers, batch, length, args.num_kv_heads, args.head_dim)
        axes = ("layers", "batch", "length", "kv_heads", "head_dim")
        k, v = (constrain(jnp.zeros(shape, args.compute_dtype), axes) for _ in range(2))
        return cls(k, v, jnp.full((batch, length), -1, jnp.int32), jnp.zeros((), jnp.int32))


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


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
    """`y = einsum(spec, x, kernel) (+ bias)`; the kernel shape is written out by the caller.

    With `lora_rank` > 0 it also holds LoRA adapters (`jaxsft.lora`): `lora_a` `[in..., r]` and
    `lora_b` `[r, out...]` (zero at init), and `y` gains `scale * dropout(x) A B`. The kernel may
    be a qwix QArray (QLoRA's frozen base), dequantized by `weight`.
    """

    def __init__(self, spec: str, shape: tuple[int, ...], axes: tuple[str, ...], *, bias: bool = False,
                 dtype, rngs: nnx.Rngs, lora_rank: int = 0, lora_scale: float = 1.0, lora_dropout: float = 0.0):
        self.spec = spec
        self.kernel = _param(rngs, shape, axes, dtype)
        # The bias has the kernel's output dims (after its leading `layers` dim, when stacked).
        inputs, output = spec.split("->")
        x_spec, kernel_spec = inputs.split(",")
        lead = len(shape) - len(kernel_spec)
        keep = list(range(lead)) + [lead + i for i, c in enumerate(kernel_spec) if c in output]
        self.bias = _param(rngs, tuple(shape[i] for i in keep), tuple(axes[i] for i in keep), dtype,
                           "zeros") if bias else None
        lora_a = lora_b = None
        if lora_rank:  # R: the rank; A contracts the kernel's input letters, B makes its output letters
            ins = [i for i, c in enumerate(kernel_spec) if c not in output]
            outs = [i for i, c in enumerate(kernel_spec) if c in output]
            rows = "".join(c for c in x_spec if c not in kernel_spec)
            # x is `rows + inputs` and y `rows + outputs`, in the kernel's order: the adapters are then
            # two plain 2-D matmuls (3-D einsums of a rank-16 operand ran 3.5x slower on the CPU).
            assert x_spec == rows + "".join(kernel_spec[i] for i in ins), spec
            assert output == rows + "".join(kernel_spec[i] for i in outs), spec
            a_dims, b_dims = list(range(lead)) + [lead + i for i in ins], [lead + i for i in outs]
            lora_a = nnx.Param(jnp.zeros(tuple(shape[i] for i in a_dims) + (lora_rank,), jnp.float32),
                               axes=tuple(axes[i] for i in a_dims) + ("lora_rank",))
            lora_b = nnx.Param(jnp.zeros(tuple(shape[i] for i in range(lead)) + (lora_rank,)
                                         + tuple(shape[i] for i in b_dims), jnp.float32),
                               axes=tuple(axes[i] for i in range(lead)) + ("lora_rank",) + tuple(axes[i] for i in b_dims))
        self.lora_a, self.lora_b = lora_a, lora_b
        self.lora_scale, self.lora_dropout = lora_scale, lora_dropout
        self.lora_rows = len(rows) if lora_rank else 0

    def weight(self, dtype) -> jax.Array:
        """The kernel in `dtype` (dequantized when the frozen base is quantized)."""
        value = self.kernel.get_value()
        return value.astype(dtype) if isinstance(value, jax.Array) else _dequantize(value, dtype)

    def delta(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The adapters' output `scale * dropout(x) A B` (dropout only with a `key`)."""
        if key is not None and self.lora_dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        rows = x.shape[:self.lora_rows]
        xa = x.reshape(math.prod(rows), -1) @ a.reshape(-1, a.shape[-1])
        y = (xa * jnp.asarray(self.lora_scale, x.dtype)) @ b.reshape(b.shape[0], -1)
        return y.reshape(*rows, *b.shape[1:])

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        y = jnp.einsum(self.spec, x, self.weight(x.dtype))
        if self.lora_a is not None:
            y = y + self.delta(x, key)
        return y + self.bias[...].astype(x.dtype) if self.bias is not None else y


def _dequantize(value, dtype) -> jax.Array:
    from jaxsft.lora import dequantize

    return dequantize(value, dtype)


def _lora(args: "ModelArgs", name: str) -> dict:
    """The `Linear` LoRA arguments of projection `name` (none unless it is a target)."""
    if not args.lora_rank or name not in args.lora_targets:
        return {}
    return {"lora_rank": args.lora_rank, "lora_scale": args.lora_alpha / args.lora_rank,
            "lora_dropout": args.lora_dropout}


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


class RMSNorm(nnx.Module):
    """`x / rms(x) * (offset + weight)` over the last axis, computed in float32 as Hugging Face does."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[str, ...], args: ModelArgs, *, rngs: nnx.Rngs):
        # Stored as Hugging Face stores it: Gemma keeps `weight` around 0 (used as 1 + weight).
        self.weight = _param(rngs, shape, axes, args.param_dtype, "zeros" if args.norm_offset else "ones")
        self.eps = args.rms_norm_eps
        self.offset = args.norm_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return ((self.offset + self.weight[...].astype(jnp.float32)) * x32).astype(x.dtype)


def rope_frequencies(rope: Rope, head_dim: int) -> jax.Array:
    """Inverse frequencies `[H/2]` of one layer, scaled as its config asks."""
    h = head_dim
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if rope.scaling == "linear":
        return inv_freq / rope.factor
    if rope.scaling != "llama3":
        return inv_freq
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * jnp.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(x / cap)` (Gemma 2's soft-capping); identity when `cap` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
    """Grouped-query attention over packed rows: a token sees earlier tokens of its own segment,
    and only the last `window` of them (itself included) in a sliding-window layer.

    Every family takes the same path: q/k/v projections with their biases and q/k norms and RoPE
    in one block (`fused.qkv_rope`), then `attention.attend_layer`, which picks the platform's
    kernel; with a KV cache the keys are the cache's slots.
    """

    def __init__(self, args: ModelArgs, lead: tuple[int, ...], lead_axes: tuple[str, ...], *, rngs: nnx.Rngs):
        d, n, k, h, dt = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, args.param_dtype
        self.q_proj = Linear("BTD,DNH->BTNH", lead + (d, n, h), lead_axes + ("embed", "heads", "head_dim"),
                             bias=args.qkv_bias, dtype=dt, rngs=rngs, **_lora(args, "q_proj"))
        self.k_proj = Linear("BTD,DKH->BTKH", lead + (d, k, h), lead_axes + ("embed", "kv_heads", "head_dim"),
                             bias=args.qkv_bias, dtype=dt, rngs=rngs, **_lora(args, "k_proj"))
        self.v_proj = Linear("BTD,DKH->BTKH", lead + (d, k, h), lead_axes + ("embed", "kv_heads", "head_dim"),
                             bias=args.qkv_bias, dtype=dt, rngs=rngs, **_lora(args, "v_proj"))
        self.o_proj = Linear("BTNH,NHD->BTD", lead + (n, h, d), lead_axes + ("heads", "head_dim", "embed"),
                             bias=args.o_bias, dtype=dt, rngs=rngs, **_lora(args, "o_proj"))
        if args.qk_norm:
            self.q_norm = RMSNorm(lead + (h,), lead_axes + ("norm",), args, rngs=rngs)
            self.k_norm = RMSNorm(lead + (h,), lead_axes + ("norm",), args, rngs=rngs)
        self.qk_norm = args.qk_norm
        self.eps, self.norm_offset = args.rms_norm_eps, args.norm_offset

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, specs: tuple, kind: jax.Array | int = 0,
                 cache: tuple[jax.Array, jax.Array, jax.Array] | None = None, key: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`(output [B, T, D], (k, v))`: this call's keys and values `[B, T, K, H]` come back for a
        KV cache. `specs`: one `AttentionSpec` per kind of layer (distinct windows), `kind` this
        layer's. With `cache=(k [B,S,K,H], v, index)` the keys are the cache slots with this call's
        T tokens written at `index`. `key`: the LoRA dropout's (training only)."""
        dtype = x.dtype
        extras = {}
        if self.q_proj.bias is not None:
            extras.update(bq=self.q_proj.bias[...], bk=self.k_proj.bias[...], bv=self.v_proj.bias[...])
        if self.qk_norm:
            extras.update(q_norm=self.q_norm.weight[...], k_norm=self.k_norm.weight[...])
        for i, (name, p) in enumerate((("lq", self.q_proj), ("lk", self.k_proj), ("lv", self.v_proj))):
            if p.lora_a is not None:  # the adapters' output joins the projection inside the fused block
                extras[name] = p.delta(x, _fold(key, i))
        q, k, v = fused.qkv_rope(x, *(p.weight(dtype) for p in (self.q_proj, self.k_proj, self.v_proj)),
                                 cos, sin, extras, self.eps, self.norm_offset)
        new = (k, v)
        if cache is not None:
            k_cache, v_cache, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        return self.o_proj(attention.attend_layer(q, k, v, specs, kind), _fold(key, 3)), new


class MLP(nnx.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU with silu, GeGLU with gelu)."""

    def __init__(self, args: ModelArgs, lead: tuple[int, ...], lead_axes: tuple[str, ...], *, rngs: nnx.Rngs):
        d, f, dt, b = args.hidden_size, args.intermediate_size, args.param_dtype, args.mlp_bias
        self.gate_proj = Linear("BTD,DF->BTF", lead + (d, f), lead_axes + ("embed", "mlp"), bias=b, dtype=dt,
                                rngs=rngs, **_lora(args, "gate_proj"))
        self.up_proj = Linear("BTD,DF->BTF", lead + (d, f), lead_axes + ("embed", "mlp"), bias=b, dtype=dt,
                              rngs=rngs, **_lora(args, "up_proj"))
        self.down_proj = Linear("BTF,FD->BTD", lead + (f, d), lead_axes + ("mlp", "embed"), bias=b, dtype=dt,
                                rngs=rngs, **_lora(args, "down_proj"))
        self.activation = args.activation

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if gate.bias is not None:
            return down(act(gate(x, _fold(key, 4))) * up(x, _fold(key, 5)), _fold(key, 6))
        # The common case: one block with a hand-written backward pass; adapters' outputs join it.
        weights = tuple(p.weight(x.dtype) for p in (gate, up, down))
        if gate.lora_a is None and up.lora_a is None and down.lora_a is None:
            return fused.gated_mlp(x, *weights, act)
        extras = {name: p.delta(x, _fold(key, i)) for i, (name, p) in enumerate((("lg", gate), ("lu", up)), 4)
                  if p.lora_a is not None}
        y, h = fused.gated_mlp_lora(x, *weights, extras, act)
        return y + down.delta(h, _fold(key, 6)) if down.lora_a is not None else y


class DecoderLayer(nnx.Module):
    """Pre-norm residual block (Gemma 2/3: sandwich norms); built with `lead=(L,)` it holds all L
    layers stacked.

    Without sandwich norms, `post_attention_layernorm` is the norm before the MLP (Llama's naming);
    with them it normalizes the attention output and `pre_feedforward_layernorm` precedes the MLP.
    """

    def __init__(self, args: ModelArgs, lead: tuple[int, ...] = (), lead_axes: tuple[str, ...] = (), *, rngs: nnx.Rngs):
        shape, axes = lead + (args.hidden_size,), lead_axes + ("norm",)
        self.input_layernorm = RMSNorm(shape, axes, args, rngs=rngs)
        self.self_attn = Attention(args, lead, lead_axes, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(shape, axes, args, rngs=rngs)
        if args.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(shape, axes, args, rngs=rngs)
            self.post_feedforward_layernorm = RMSNorm(shape, axes, args, rngs=rngs)
        self.mlp = MLP(args, lead, lead_axes, rngs=rngs)
        self.sandwich = args.sandwich_norms

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, specs: tuple, kind: jax.Array | int = 0,
                 cache=None, key: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`(output [B, T, D], (k, v))` with this call's keys and values (see `Attention`); `key`:
        this layer's LoRA dropout key (training only)."""
        attn, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, specs, kind, cache, key)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), key))
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x), key)
        return constrain(x, ("batch", "length", "act_embed")), new_kv


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class Embedding(nnx.Module):
    """Token embedding table `[V, D]`, times `embed_scale` (Gemma: sqrt(D), rounded to the weight dtype)."""

    def __init__(self, args: ModelArgs, *, rngs: nnx.Rngs):
        self.weight = _param(rngs, (args.vocab_size, args.hidden_size), ("vocab", "embed"), args.param_dtype)
        self.scale = args.embed_scale

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.weight[...], tokens, axis=0)
        return x * jnp.asarray(self.scale, x.dtype) if self.scale != 1.0 else x


class DecoderModel(nnx.Module):
    """Embedding -> scanned decoder layers -> final norm (Hugging Face's `model.*`)."""

    def __init__(self, args: ModelArgs, *, rngs: nnx.Rngs):
        self.args = args
        self.embed_tokens = Embedding(args, rngs=rngs)
        self.layers = DecoderLayer(args, (args.num_layers,), ("layers",), rngs=rngs)
        self.norm = RMSNorm((args.hidden_size,), ("norm",), args, rngs=rngs)

    def _layer_plan(self, base: AttentionSpec):
        """`(specs, kinds, inv_freq)`: one attention spec per distinct window of the model, each
        layer's index into them (`[L]`), and each layer's RoPE inverse frequencies `[L, H/2]`."""
        args = self.args
        windows = args.layer_windows or (0,) * args.num_layers
        distinct = sorted(set(windows))
        specs = tuple(base.replace(window=w) for w in distinct)
        ropes = args.layer_ropes or (Rope(),) * args.num_layers
        freqs = {r: rope_frequencies(r, args.head_dim) for r in set(ropes)}
        return specs, tuple(distinct.index(w) for w in windows), jnp.stack([freqs[r] for r in ropes])

    def _static(self, backend: str) -> dict:
        args = self.args
        scale = args.attn_scale if args.attn_scale is not None else args.head_dim**-0.5
        return {"softcap": args.attn_softcap, "scale": scale, "backend": backend}

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = self.embed_tokens(tokens).astype(self.args.compute_dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, max_segment_len: int = 0,
                 attention_backend: str = "reference", dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states `[B, T, D]` of packed rows: a token sees the earlier tokens of its
        segment (training, eval, scoring).

        `max_segment_len` (0: unknown) is the caller's promise that each segment is one run of at
        most that many tokens whose positions count up by one (packed rows): then no token sees a
        key that many tokens back, and attention may skip those keys (the padding rows' outputs,
        trained on by nothing, may differ). `attention_backend`: see `jaxsft.models.attention`.
        `dropout_key` (training only): the LoRA dropout's, split over the layers.
        """
        args = self.args
        x = self._embed(tokens)
        base = AttentionSpec.packed(segment_ids, positions, lookback=max_segment_len, **self._static(attention_backend))
        specs, kinds, inv_freq = self._layer_plan(base)
        graphdef, stacked = nnx.split(self.layers)

        keys = None if dropout_key is None else jax.random.split(dropout_key, args.num_layers)

        def body(h, layer_state, layer_inv_freq, kind, key):
            layer = nnx.merge(graphdef, layer_state)
            return layer(h, *_rope_cos_sin(positions, layer_inv_freq), specs, kind, key=key)[0]

        if args.scan_layers:  # each layer's kind is scanned with its weights; attend_layer switches on it
            step = lambda h, xs: (body(h, *xs), None)  # noqa: E731
            if args.remat != "none":
                step = jax.checkpoint(step, policy=_REMAT_POLICIES[args.remat], prevent_cse=False)
            x, _ = jax.lax.scan(step, x, (stacked, inv_freq, jnp.asarray(kinds, jnp.int32), keys))
        else:  # the same stacked weights, layer i sliced out: checkpoints and shardings do not change
            if args.remat != "none":
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[args.remat], prevent_cse=False,
                                      static_argnums=(3,))
            for i in range(args.num_layers):
                x = body(x, jax.tree.map(lambda a, i=i: a[i], stacked), inv_freq[i], kinds[i],
                         None if keys is None else keys[i])
        return self.norm(x)

    def decode(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """`(hidden [B, T, D], cache)` for generation: a token sees the cache's filled slots at
        positions up to its own, this call's tokens included; tokens with `valid == 0` are padding,
        written as empty slots. The same layers and the same attention entry point as training."""
        x = self._embed(tokens)
        key_positions = jax.lax.dynamic_update_slice_in_dim(
            cache.positions, jnp.where(valid > 0, positions, -1).astype(jnp.int32), cache.index, axis=1)
        specs, kinds, inv_freq = self._layer_plan(AttentionSpec.cached(positions, key_positions,
                                                                       **self._static("reference")))
        graphdef, stacked = nnx.split(self.layers)

        def body(h, xs):
            # Each layer's cache is scanned in and out (not the whole cache carried): XLA on the CPU
            # copied the carried [L, ...] cache at every layer, 6-7x slower steps at 20 rows.
            layer_state, layer_inv_freq, kind, k_layer, v_layer = xs
            layer = nnx.merge(graphdef, layer_state)
            h, (k, v) = layer(h, *_rope_cos_sin(positions, layer_inv_freq), specs, kind,
                              cache=(k_layer, v_layer, cache.index))
            k_layer = jax.lax.dynamic_update_slice_in_dim(k_layer, k.astype(k_layer.dtype), cache.index, axis=1)
            v_layer = jax.lax.dynamic_update_slice_in_dim(v_layer, v.astype(v_layer.dtype), cache.index, axis=1)
            return h, (k_layer, v_layer)

        x, (k_all, v_all) = jax.lax.scan(body, x, (stacked, inv_freq, jnp.asarray(kinds, jnp.int32), cache.k, cache.v))
        return self.norm(x), KVCache(k_all, v_all, key_positions, cache.index + tokens.shape[1])


def _rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's RoPE cos and sin `[B, T, H]` (Hugging Face's half-split layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B,T,H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class CausalLM(nnx.Module):
    """Decoder plus LM head (Hugging Face's `*ForCausalLM`); returns float32 logits `[B, T, V]`."""

    def __init__(self, args: ModelArgs, *, rngs: nnx.Rngs):
        self.args = args
        self.model = DecoderModel(args, rngs=rngs)
        if not args.tie_word_embeddings:
            self.lm_head = Linear("BTD,DV->BTV", (args.hidden_size, args.vocab_size), ("head_embed", "head_vocab"),
                                  dtype=args.param_dtype, rngs=rngs)

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, max_segment_len: int = 0,
                      attention_backend: str | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states `[B, T, D]` (the loss applies the head itself, in chunks); see
        `DecoderModel` for `max_segment_len`. `attention_backend` (None: `auto` for the default
        device's platform): see `jaxsft.models.attention`. `dropout_key`: LoRA dropout (training)."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        backend = attention_backend or attention.resolve("auto", jax.default_backend())
        return self.model(tokens, positions, segment_ids, max_segment_len, backend, dropout_key)

    def decode(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """`(hidden [B, T, D], new_cache)`: one prefill or decoding step against `cache` (see `DecoderModel.decode`)."""
        return self.model.decode(tokens, positions, valid, cache)

    def head_kernel(self) -> jax.Array:
        """The `[D, V]` output projection (the embedding, transposed, when tied)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.weight[...].T
        return self.lm_head.kernel[...]

    @property
    def logit_softcap(self) -> float | None:
        """Gemma 2's final soft-cap: logits are `cap * tanh(head(h) / cap)`; None for other models."""
        return self.args.final_softcap

    def logits(self, x: jax.Array) -> jax.Array:
        """Float32 logits `[..., V]` of final hidden states `[..., D]` (soft-capped where the model caps)."""
        logits = jnp.einsum("...D,DV->...V", x, self.head_kernel().astype(x.dtype), preferred_element_type=jnp.float32)
        return softcap(logits, self.logit_softcap)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden_states(tokens, positions, segment_ids))
