"""Every supported family against Hugging Face PyTorch (eager attention), in float32.

Each family gets a tiny random checkpoint built with its transformers class, with every switch
that family has turned on and made to matter: sliding windows shorter than the sequence (local and
global layers side by side), soft-caps small enough to bend the scores, biases and norm weights
moved off their zero/one init, llama3 and linear RoPE scaling, a local RoPE base. Checked: logits,
packed rows (each segment equals Hugging Face on that segment alone), the gradient of the
completion-masked loss for every parameter, the key map both ways, and sharded loading.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft.models import from_pretrained
from jaxsft.models.hf_io import iter_hf_tensors
from jaxsft.stepspec import StepSpec
from jaxsft.loss import loss_sums

VOCAB, SEQ = 160, 20
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# model_type -> (config class, family-specific settings). Windows are shorter than SEQ and than
# the packed segments, so the sliding layers see less than the full ones.
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                  tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "gemma": ("GemmaConfig", dict()),
    "gemma2": ("Gemma2Config", dict(sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                                    final_logit_softcapping=1.5)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        sliding_window=5, query_pre_attn_scalar=24, final_logit_softcapping=1.5,
        attn_logit_softcapping=1.0,  # Hugging Face's Gemma 3 code ignores it; so must we
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}})),
}


def build_hf(model_type: str, out, seed: int = 0, **save_kwargs):
    """A tiny random Hugging Face model of one family (eager attention), saved to `out`."""
    config_class, settings = FAMILIES[model_type]
    config = getattr(transformers, config_class)(**COMMON, **settings)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # move every weight off its init (zero biases, unit/zero norms) so each one matters
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(out, **save_kwargs)
    return hf.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """`(model_type, hf_dir, hf_model)`: a tiny random checkpoint of one family, saved and in memory."""
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, build_hf(request.param, out)


def hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def masked_loss(logits, targets, mask):
    """Completion-masked loss: sum of cross entropy over trained tokens / their count."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


def test_settings_take_effect(family):
    model_type, hf_dir, _ = family
    args = from_pretrained(hf_dir).args
    windows = {"llama": (0, 0, 0), "mistral": (5, 5, 5), "qwen2": (0, 6, 6), "qwen3": (0, 0, 4), "gemma": (0, 0, 0),
               "gemma2": (5, 0, 5), "gemma3_text": (5, 0, 5)}
    assert args.layer_windows == windows[model_type]
    if model_type == "gemma3_text":
        assert [r.theta for r in args.layer_ropes] == [100.0, 10000.0, 100.0]
        assert args.attn_softcap is None and args.final_softcap == 1.5


def test_logits_and_packed_rows_match_hugging_face(family):
    model_type, hf_dir, hf = family
    model = from_pretrained(hf_dir)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
    rng = np.random.RandomState(0)

    tokens = rng.randint(0, VOCAB, size=(2, SEQ))
    positions = np.broadcast_to(np.arange(SEQ), tokens.shape)
    ours = np.asarray(forward(params, tokens, positions, np.ones_like(tokens)))
    assert np.abs(ours - hf_logits(hf, tokens)).max() <= 1e-4

    # One packed row of three examples, each longer than every window, then padding (segment 0).
    lengths, row = [7, 9, 6], 24
    tokens, segments, positions = np.zeros((3, 1, row), np.int32)
    start = 0
    for seg, n in enumerate(lengths, start=1):
        tokens[0, start:start + n] = rng.randint(0, VOCAB, size=n)
        segments[0, start:start + n], positions[0, start:start + n] = seg, np.arange(n)
        start += n
    packed = np.asarray(forward(params, tokens, positions, segments))
    start = 0
    for n in lengths:
        alone = hf_logits(hf, tokens[:, start:start + n])
        assert np.abs(packed[:, start:start + n] - alone).max() <= 1e-4
        start += n


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_packed_rows_with_longest_example_match_hugging_face(family, scan_layers, monkeypatch):
    """`max_segment_len` (the longest packed example) lets attention skip keys further back (and, in
    sliding-window layers, those a window back); the logits of every example stay Hugging Face's."""
    from jaxsft.models import fused

    monkeypatch.setattr(fused, "LOOKBACK_BLOCK", 4)
    model_type, hf_dir, hf = family
    model = from_pretrained(hf_dir, scan_layers=scan_layers)
    rng = np.random.RandomState(2)
    lengths = [7, 9, 6]
    tokens, segments, positions = np.zeros((3, 1, 24), np.int32)
    start = 0
    for seg, n in enumerate(lengths, start=1):
        tokens[0, start:start + n] = rng.randint(0, VOCAB, size=n)
        segments[0, start:start + n], positions[0, start:start + n] = seg, np.arange(n)
        start += n
    packed = np.asarray(jax.jit(lambda *a: model.logits(model.hidden_states(*a, max_segment_len=9)))(
        tokens, positions, segments))
    start = 0
    for n in lengths:
        assert np.abs(packed[:, start:start + n] - hf_logits(hf, tokens[:, start:start + n])).max() <= 1e-4
        start += n


def test_gradients_match_torch_autograd(family):
    model_type, hf_dir, hf = family
    model = from_pretrained(hf_dir)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, VOCAB, size=(2, SEQ))
    targets = rng.randint(0, VOCAB, size=(2, SEQ))
    mask = (rng.rand(2, SEQ) < 0.6).astype(np.float32)

    # The training loss itself: hidden states -> chunked head (final soft-cap included) -> masked sums.
    batch = {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask),
             "positions": jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ)), "segment_ids": jnp.ones((2, SEQ), jnp.int32)}

    def loss_fn(p):
        loss_sum, (n, _) = loss_sums(graphdef, p, batch, StepSpec(loss_chunk=8, loss_whole_mib=0))
        return loss_sum / n

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)

    hf.zero_grad()
    logits = hf(torch.tensor(tokens)).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(targets).reshape(-1),
                                            reduction="none")
    m = torch.tensor(mask).reshape(-1)
    hf_loss = (nll * m).sum() / m.sum()
    hf_loss.backward()
    assert abs(float(loss) - hf_loss.item()) <= 1e-5

    hf_grads = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    ours = dict(iter_hf_tensors(grads, model.args.num_layers))
    assert ours.keys() == hf_grads.keys()
    for key, g in hf_grads.items():
        err = np.linalg.norm(ours[key] - g) / np.linalg.norm(g)
        assert err <= 1e-4, (key, err)


def test_key_map_round_trips(family):
    """Our parameters, written back with Hugging Face names and layouts, are the checkpoint's tensors."""
    _, hf_dir, hf = family
    model = from_pretrained(hf_dir)
    ours = dict(iter_hf_tensors(nnx.to_pure_dict(nnx.state(model)), model.args.num_layers))
    theirs = {k: p.detach().numpy() for k, p in hf.named_parameters()}
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text"])
def test_sharded_load_matches_hugging_face(model_type, tmp_path_factory):
    """Loaded onto an fsdp x tensor mesh shard by shard, from several files and from bfloat16 files."""
    from jaxsft.config import MeshConfig
    from jaxsft.parallel import make_mesh

    out = tmp_path_factory.mktemp(f"{model_type}_sharded")
    hf = build_hf(model_type, out, seed=2, max_shard_size="100KB")  # several files with an index, too

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = from_pretrained(out, mesh=mesh)
    q = sharded.model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, VOCAB, size=(2, SEQ)))
    np.testing.assert_allclose(np.asarray(sharded(tokens)), hf_logits(hf, np.asarray(tokens)), atol=1e-4)

    bf16_dir = tmp_path_factory.mktemp(f"{model_type}_bf16")
    hf.to(torch.bfloat16).save_pretrained(bf16_dir)  # the usual checkpoint dtype: read, then upcast
    model = from_pretrained(bf16_dir, mesh=mesh)
    ours = dict(iter_hf_tensors(nnx.to_pure_dict(nnx.state(model)), model.args.num_layers))
    for k, p in hf.named_parameters():
        np.testing.assert_array_equal(ours[k], p.detach().float().numpy())


@pytest.mark.parametrize("family", ["gemma2"], indirect=True)  # sandwich norms, soft-caps and windows
def test_remat_and_bfloat16(family):
    """Remat policies change nothing; bfloat16 parameters and compute stay close to float32."""
    _, hf_dir, _ = family
    rng = np.random.RandomState(4)
    tokens, targets = jnp.asarray(rng.randint(0, VOCAB, size=(2, 2, SEQ)))
    mask = jnp.ones((2, SEQ))

    def loss_and_grads(model):
        graphdef, params = nnx.split(model)
        fn = jax.jit(jax.value_and_grad(lambda p: masked_loss(nnx.merge(graphdef, p)(tokens), targets, mask)))
        return fn(nnx.to_pure_dict(params))

    base, base_grads = loss_and_grads(from_pretrained(hf_dir))
    for remat in ("full", "dots"):
        value, grads = loss_and_grads(from_pretrained(hf_dir, remat=remat))
        np.testing.assert_allclose(value, base, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
            assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b)

    ref = np.asarray(from_pretrained(hf_dir)(tokens))
    low = from_pretrained(hf_dir, "bfloat16", compute_dtype="bfloat16")
    assert low.model.embed_tokens.weight[...].dtype == jnp.bfloat16
    logits = np.asarray(low(tokens))
    assert logits.dtype == np.float32 and np.abs(logits - ref).max() <= 0.1


def test_safetensors_reader_reads_exact_slices(tmp_path):
    """Positioned reads of any block (contiguous or strided rows) give numpy's slice."""
    from safetensors.numpy import save_file

    from jaxsft.models.hf_io import SafetensorsFile

    x = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    save_file({"x": x, "b": np.arange(7, dtype=np.int64)}, tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    for index in [(slice(None),) * 3, (slice(1, 3),), (slice(0, 4), slice(2, 5)),
                  (slice(1, 2), slice(0, 6), slice(1, 4)), (slice(2, 4), slice(3, 3))]:
        np.testing.assert_array_equal(f.read("x", index), x[index])
    np.testing.assert_array_equal(f.read("b", (slice(2, 6),)), np.arange(2, 6))
    f.close()
