"""Generation: KV-cache decoding against Hugging Face `generate`, sampling, stops, prompts, the CLI.

Every family's tiny random checkpoint (tests/test_families.py's `build_hf`: sliding windows shorter
than prompt + generation, soft-caps, biases, per-layer RoPE) decodes a batch of prompts of
different lengths, left- and right-padded, to the tokens Hugging Face's greedy `generate` gives
each prompt alone. Random Gemma models mostly repeat one token greedily, so for them the cached
path's logits are also checked step by step against Hugging Face's full forward pass.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import DEMO_EVAL
from test_families import FAMILIES, VOCAB, build_hf
from jaxsft.cli import main
from jaxsft.config import GenerateConfig, load_config
from jaxsft.evaluate import held_out
from jaxsft.generate import apply_stop_strings, decode, load_model, render_prompt, sample
from jaxsft.models import from_pretrained
from jaxsft.models.decoder import KVCache

NEW = 12  # new tokens; the longest prompt (14) plus these is several times every window (4-6)
PROMPT_LENGTHS = (3, 14, 9)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """`(model_type, hf_dir, hf_model)` with Hugging Face's own stopping turned off."""
    out = tmp_path_factory.mktemp(request.param)
    hf = build_hf(request.param, out)
    hf.generation_config.eos_token_id = None  # compare NEW tokens exactly, whatever they are
    return request.param, out, hf


def hf_greedy(hf, prompt: np.ndarray) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompt[None]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_hugging_face_generate(family):
    model_type, hf_dir, hf = family
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, VOCAB, size=n) for n in PROMPT_LENGTHS]
    expected = [hf_greedy(hf, p) for p in prompts]
    model = from_pretrained(hf_dir)
    cfg = GenerateConfig(max_new_tokens=NEW, batch_size=2)  # two batches, the second filled up
    for padding in ("left", "right"):
        ours = decode(model, [p.tolist() for p in prompts], cfg, padding=padding)
        assert ours == expected, (model_type, padding)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"], indirect=True)
def test_cached_logits_match_full_forward(family):
    """Prefill of left-padded prompts, then one token at a time: each step's logits are Hugging
    Face's at that position of the whole sequence (padding, windows and soft-caps included)."""
    _, hf_dir, hf = family
    rng = np.random.RandomState(1)
    total, pads = 20, (0, 5)
    seqs = rng.randint(0, VOCAB, size=(2, total))
    prefill = 8  # prompt slots; row 1 has 5 padding slots before its 3 prompt tokens
    model = from_pretrained(hf_dir)
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, tokens, positions, valid, cache):
        m = nnx.merge(graphdef, params)
        hidden, cache = m.decode(tokens, positions, valid, cache)
        return m.logits(hidden), cache

    tokens = np.zeros((2, prefill), np.int32)
    valid = np.zeros_like(tokens)
    for r, pad in enumerate(pads):
        tokens[r, pad:], valid[r, pad:] = seqs[r, :prefill - pad], 1
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    cache = KVCache.empty(model.args, 2, total + 5)
    logits, cache = step(params, tokens, positions, valid, cache)
    ours = [np.asarray(logits[r, -1]) for r in range(2)]
    steps = [[o] for o in ours]
    for i in range(total - prefill):
        pos = np.array([[prefill - pad + i] for pad in pads])
        nxt = np.take_along_axis(seqs, pos, 1).astype(np.int32)
        logits, cache = step(params, nxt, pos, np.ones((2, 1), np.int32), cache)
        for r in range(2):
            steps[r].append(np.asarray(logits[r, 0]))
    with torch.no_grad():
        for r, pad in enumerate(pads):
            n = prefill - pad + len(steps[r]) - 1  # the tokens fed to the model in row r
            full = hf(torch.tensor(seqs[r:r + 1, :n])).logits[0].numpy()
            np.testing.assert_allclose(np.stack(steps[r]), full[prefill - pad - 1:], atol=1e-4)


def test_sampling():
    logits = jax.random.normal(jax.random.PRNGKey(0), (64, 50)) * 3
    keys = jax.random.split(jax.random.PRNGKey(1), 20)
    greedy = np.asarray(sample(logits, keys[0]))
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    np.testing.assert_array_equal(sample(logits, keys[0], 1.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample(logits, keys[0], 1.0, top_p=1e-6), greedy)
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    draws = np.stack([sample(logits, k, 2.0, top_k=3) for k in keys], 1)  # [64, 20]
    assert all(set(row) <= set(t) for row, t in zip(draws, top3))
    assert len(np.unique(draws)) > 3  # it does sample
    # top-p: only tokens of the smallest most-likely set holding p of the probability
    probs = np.asarray(jax.nn.softmax(logits, -1))
    order = np.argsort(-probs, -1)
    mass = np.take_along_axis(probs, order, -1).cumsum(-1)
    draws = np.stack([sample(logits, k, 1.0, top_p=0.6) for k in keys], 1)
    for row, o, m in zip(draws, order, mass):
        assert set(row) <= set(o[:np.searchsorted(m, 0.6) + 1])


def test_stops(tiny_llama):
    loaded = load_model(tiny_llama)
    prompts = [loaded.prompt("Extract the order as JSON."), loaded.prompt("Hi")]
    cfg = GenerateConfig(max_new_tokens=10, batch_size=2)
    free = decode(loaded.model, prompts, cfg)
    assert [len(x) for x in free] == [10, 10]
    stop = free[0][3]  # stop at this token: row 0 ends with it, at its first occurrence
    stopped = decode(loaded.model, prompts, cfg, stop_ids=[stop])
    assert stopped[0] == free[0][:free[0].index(stop) + 1]
    assert stopped[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])
    assert apply_stop_strings("abc}\ndef", ["\n", "}"]) == "abc"
    assert apply_stop_strings("abc", ["x"]) == "abc"
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.stop_ids


def test_prompts_render_as_in_training(tiny_llama):
    """`render_prompt` (generate's prompts) = the tokens before the trained completion (training's)."""
    loaded = load_model(tiny_llama)
    cfg = load_config(None, [f"data.eval={DEMO_EVAL}"])
    items = held_out(cfg, loaded.tokenizer, limit=5)
    records = [json.loads(x) for x in DEMO_EVAL.read_text().splitlines()[:5]]
    assert [render_prompt(loaded.tokenizer, r["prompt"]) for r in records] == [it.prompt_ids for it in items]
    assert [it.reference for it in items] == [r["completion"] for r in records]


def test_generate_cli(tiny_llama, tmp_path, capsys):
    assert main(["generate", str(tiny_llama), "--prompt", "Hello", "max_new_tokens=5", "stop=[zzz]"]) == 0
    one = capsys.readouterr().out
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "left out"}]}) + "\n")
    assert main(["generate", str(tiny_llama), "--file", str(path), "max_new_tokens=5"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["generation"] == rows[1]["generation"] == one.rstrip("\n")
    assert main(["generate", str(tiny_llama), "--prompt", "x", "top_p=2"]) == 2
    assert "top_p" in capsys.readouterr().err
