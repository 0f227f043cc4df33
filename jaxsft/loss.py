"""Completion-masked cross entropy, computed in chunks of the sequence.

The loss of a step is `sum of cross entropy over trained tokens / trained tokens in the global
batch`; this module returns the sums (loss, trained tokens, correct predictions) so that the
caller divides once, after summing over micro-batches and devices. The `[B, T, V]` float32 logits
are never materialized whole: the head is applied to one chunk of positions at a time and
recomputed in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                       chunk: int = 256, softcap: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns `(loss_sum, trained_tokens, correct)` over the positions where `loss_mask` is 1.

    hidden: [B, T, D] final hidden states; head: [D, V]; targets, loss_mask: [B, T]. `chunk` is
    the number of positions whose logits exist at once; 0 computes the whole `[B, T, V]` at once
    (only for comparison: its memory grows with T x V). `softcap` (Gemma 2) maps the logits to
    `cap * tanh(logits / cap)` first, as the model's own head does.
    """
    b, t, d = hidden.shape
    chunk = min(chunk or t, t)
    while t % chunk:  # largest chunk size <= the requested one that divides T
        chunk -= 1
    n = t // chunk
    # [n, B, chunk, ...]: scan over chunks of positions.
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ms = loss_mask.reshape(b, n, chunk).swapaxes(0, 1).astype(jnp.float32)

    @jax.checkpoint
    def one_chunk(h, tgt, m):
        logits = jnp.einsum("BCD,DV->BCV", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == tgt).astype(jnp.float32)
        return jnp.sum((lse - target_logit) * m), jnp.sum(correct * m)

    def body(carry, xs):
        loss_sum, correct = one_chunk(*xs)
        return (carry[0] + loss_sum, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ms))
    return loss_sum, jnp.sum(ms), correct
