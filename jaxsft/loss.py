"""Completion-masked cross entropy, computed in chunks of the sequence.

The loss of a step is `sum of cross entropy over trained tokens / trained tokens in the global
batch`; this module returns the sums (loss, trained tokens, correct predictions) so that the
caller divides once, after summing over micro-batches and devices. Large `[B, T, V]` float32
logits (a 128k vocabulary at long sequences) are never materialized whole: the head is applied to
one chunk of positions at a time and recomputed in the backward pass. Small ones (up to
`whole_bytes`, 64 MiB by default) are computed at once and kept for the backward pass, which is
faster and costs little memory. Where no row holds more than `row_trained` trained targets
(about half the positions of prompt-and-answer data), the head and the cross entropy read only
that many positions per row, gathered (`trained_rows`), not the whole row.

`loss_sums` is the model's loss on one batch as a step's `StepSpec` shapes it: the train step
differentiates it, and `make_eval_step` jits it for the held-out loss (`held_out_loss`) of
training and `jaxsft eval`, so both read the same numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft import lora, parallel
from jaxsft.parallel import constrain
from jaxsft.stepspec import StepSpec


def trained_rows(hidden: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                 row_trained: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's first `row_trained` trained positions, in order, then untrained ones to fill:
    `hidden [B, row_trained, D]`, `targets` and `loss_mask [B, row_trained]`. Exact (every trained
    target kept) when no row holds more than `row_trained` of them."""
    idx = jnp.argsort((loss_mask == 0).astype(jnp.int32), axis=1, stable=True)[:, :row_trained]
    return (jnp.take_along_axis(hidden, idx[..., None], axis=1), jnp.take_along_axis(targets, idx, axis=1),
            jnp.take_along_axis(loss_mask, idx, axis=1))


def cross_entropy_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                       chunk: int = 256, softcap: float | None = None, whole_bytes: int = 64 * 2**20,
                       row_trained: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns `(loss_sum, trained_tokens, correct)` over the positions where `loss_mask` is 1.

    hidden: [B, T, D] final hidden states; head: [D, V]; targets, loss_mask: [B, T]. Logits of at
    most `whole_bytes` (float32 `[B, T, V]`) are computed whole and kept for the backward pass;
    larger ones `chunk` positions at a time, recomputed in the backward pass. `chunk=0` computes
    them whole at any size (only for comparison: that memory grows with T x V). `softcap` (Gemma 2)
    maps the logits to `cap * tanh(logits / cap)` first, as the model's own head does.
    `row_trained` (0: off): no row holds more trained targets than that, so only that many
    positions per row are read (`trained_rows`).
    """
    if 0 < row_trained < hidden.shape[1]:
        hidden, targets, loss_mask = trained_rows(hidden, targets, loss_mask, row_trained)
    b, t, d = hidden.shape

    # Vocabulary-parallel on a mesh (see parallel.RULES): the head split along V, each chunk's rows
    # gathered over fsdp; a device computes every row's logits for its share of the vocabulary, and
    # the head's gradient (accumulated over the chunks) is computed split as the head is stored.
    head = constrain(head, ("head_embed", "head_vocab"))

    def one_chunk(h, tgt, m):
        h, tgt, m = (constrain(x, ("loss_batch",) + (None,) * (x.ndim - 1)) for x in (h, tgt, m))
        logits = jnp.einsum("BCD,DV->BCV", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("loss_batch", None, "head_vocab"))
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        lse = jax.nn.logsumexp(logits, axis=-1)
        # The target's logit as a masked sum (not a gather): it stays split along the vocabulary.
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == tgt[..., None]
        target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        correct = (jnp.argmax(logits, axis=-1) == tgt).astype(jnp.float32)
        return jnp.sum((lse - target_logit) * m), jnp.sum(correct * m)

    mask = loss_mask.astype(jnp.float32)
    if chunk == 0 or b * t * head.shape[1] * 4 <= whole_bytes:
        loss_sum, correct = one_chunk(hidden, targets, mask)
        return loss_sum, jnp.sum(mask), correct

    chunk = min(chunk, t)
    while t % chunk:  # largest chunk size <= the requested one that divides T
        chunk -= 1
    n = t // chunk
    # [n, B, chunk, ...]: scan over chunks of positions, each recomputed in the backward pass.
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ms = mask.reshape(b, n, chunk).swapaxes(0, 1)
    one_chunk = jax.checkpoint(one_chunk)

    def body(carry, xs):
        loss_sum, correct = one_chunk(*xs)
        return (carry[0] + loss_sum, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ms))
    return loss_sum, jnp.sum(ms), correct


def loss_sums(graphdef: nnx.GraphDef, params: Any, batch: dict, spec: StepSpec = StepSpec(), frozen: Any = None,
              dropout_key: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`(loss_sum, (trained_tokens, correct))` of the model on one batch-contract batch, as `spec`
    shapes it (see `jaxsft.stepspec.StepSpec`, and `cross_entropy_sums` for the chunking).

    With LoRA, `params` are the adapters and `frozen` the base they join (see `jaxsft.lora`);
    `dropout_key` drives the adapters' dropout."""
    model = nnx.merge(graphdef, params if frozen is None else lora.combine(frozen, params))
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                 max_segment_len=spec.max_segment_len, attention_backend=spec.attention,
                                 dropout_key=dropout_key)
    loss_sum, n, correct = cross_entropy_sums(hidden, model.head_kernel(), batch["targets"], batch["loss_mask"],
                                              chunk=spec.loss_chunk, softcap=model.logit_softcap,
                                              whole_bytes=spec.loss_whole_mib * 2**20, row_trained=spec.row_trained)
    return loss_sum, (n, correct)


def make_eval_step(graphdef, mesh, params_shardings, spec: StepSpec = StepSpec(), frozen_shardings: Any = None):
    """The jitted `(params, batch) -> (loss_sum, trained_tokens, correct)` (training's held-out
    loss and `jaxsft eval`'s completion loss); with `frozen_shardings` (LoRA),
    `(adapters, batch, frozen) -> ...`."""
    def step(params, batch, frozen=None):
        with parallel.activation_sharding(mesh):
            loss_sum, (n, correct) = loss_sums(graphdef, params, batch, spec, frozen)
            return loss_sum, n, correct
    in_shardings = (params_shardings, parallel.batch_sharding(mesh))
    if frozen_shardings is not None:
        in_shardings += (frozen_shardings,)
    return jax.jit(step, in_shardings=in_shardings)


def held_out_loss(eval_step, params, batches: list[dict], *frozen) -> float:
    """Completion loss over the held-out (global, on-device) batches: sum over trained tokens / their
    count (`frozen`: LoRA's base, for an eval step made with `frozen_shardings`)."""
    total, count = 0.0, 0.0
    for batch in batches:
        s, n, _ = eval_step(params, batch, *frozen)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
