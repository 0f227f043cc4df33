"""The memory-lean loss: the compiled step's temporaries with a 128k vocabulary.

Compiles the real train step (ahead of time, abstract inputs, nothing allocated) for a Llama-3
sized vocabulary (128256) at sequence length 2048, batch 1, once with the chunked loss and once
computing the whole `[B, T, V]` float32 logits, and compares XLA's `memory_analysis()`. The body
is kept narrow and rematerialized (both arms alike) so that what differs is the loss: attention's
`[T, T]` scores of one layer and the parameter-sized optimizer temporaries are the floor.
"""

import jax

from jaxsft.aot import compile_train_step
from jaxsft.config import load_config
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
