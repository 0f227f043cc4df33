"""The memory-lean loss: the compiled step's temporaries with a 128k vocabulary.

Compiles the real train step (ahead of time, abstract inputs, nothing allocated) for a Llama-3
sized vocabulary (128256) at sequence length 2048, batch 1, once with the chunked loss and once
computing the whole `[B, T, V]` float32 logits, and compares XLA's `memory_analysis()`. The body
is kept narrow and rematerialized (both arms alike) so that what differs is the loss: attention's
`[T, T]` scores of one layer and the parameter-sized optimizer temporaries are the floor.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxsft.aot import compile_train_step
from jaxsft.config import load_config
from jaxsft.loss import cross_entropy_sums
from jaxsft.parallel import make_mesh

HF_CONFIG = {  # Llama 3's vocabulary on a narrow 2-layer body
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 64, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}


def temp_bytes(loss_chunk: int) -> int:
    cfg = load_config(None, ["data.seq_len=2048", "train.batch_size=1", "mesh.fsdp=1",
                             "model.remat=full", f"train.loss_chunk={loss_chunk}"])
    step = compile_train_step(HF_CONFIG, cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    return step.memory()["temp"]


def test_chunked_loss_needs_a_quarter_of_the_full_logits_memory():
    full, lean = temp_bytes(0), temp_bytes(256)
    logits = 2048 * 128256 * 4
    print(f"\ntemporaries: full logits {full / 2**20:,.0f} MiB, chunked loss {lean / 2**20:,.0f} MiB "
          f"({lean / full:.1%}); one [1, 2048, 128256] float32 logits array is {logits / 2**20:,.0f} MiB")
    assert full >= logits  # the comparison is real: the full step does hold the logits
    assert lean <= full / 4


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_loss_equals_whole_logits(softcap):
    """Chunks (one that divides T, one that does not, recomputed in the backward pass) give the
    whole-logits loss, trained-token count, correct count and gradients."""
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    b, t, d, v = 2, 24, 16, 50
    hidden, head = jax.random.normal(ks[0], (b, t, d)), jax.random.normal(ks[1], (d, v))
    targets = jax.random.randint(ks[2], (b, t), 0, v)
    mask = (jax.random.uniform(ks[3], (b, t)) < 0.5).astype(jnp.int32)

    def run(**kw):
        def f(h, w):
            loss_sum, n, correct = cross_entropy_sums(h, w, targets, mask, softcap=softcap, **kw)
            return loss_sum, (n, correct)
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, head)

    (whole, (n, correct)), grads = run(chunk=0)
    assert run(chunk=8)[0][0] == whole  # small logits are computed whole whatever the chunk
    for chunk in (8, 7):
        (loss, (n2, correct2)), grads2 = run(chunk=chunk, whole_bytes=0)
        assert abs(float(loss - whole)) <= 1e-5 * abs(float(whole))
        assert n2 == n == mask.sum() and correct2 == correct
        for a, b_ in zip(grads2, grads):
            assert float(jnp.linalg.norm(a - b_) / jnp.linalg.norm(b_)) <= 1e-5
