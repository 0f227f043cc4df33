"""Real weights: SmolLM2-135M-Instruct against transformers, in float32.

tools/get_smollm2.sh fetches a pinned Q4_1 GGUF file (sha256-checked) and imports it once per
cache with `jaxsft import-gguf`; every test here uses that one directory. Checked: jaxsft's logits
on an English passage rendered through the chat template, greedy generation token for token,
a few training steps that lower the loss, and the import itself (the directory's logits in
transformers equal transformers' own load of the GGUF file). Skipped when the download fails for
want of a network.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DEMO_TRAIN, ROOT
from jaxsft.config import GenerateConfig, load_config
from jaxsft.generate import decode, load_model, render_prompt
from jaxsft.train import train

GETTYSBURG = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal.\n\n"
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so "
    "dedicated, can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion "
    "of that field, as a final resting place for those who here gave their lives that that nation might live. It is "
    "altogether fitting and proper that we should do this.\n\n"
    "But, in a larger sense, we can not dedicate, we can not consecrate, we can not hallow, this ground. The brave "
    "men, living and dead, who struggled here, have consecrated it, far above our poor power to add or detract. The "
    "world will little note, nor long remember what we say here, but it can never forget what they did here. It is "
    "for us the living, rather, to be dedicated here to the unfinished work which they who fought here have thus far "
    "so nobly advanced. It is rather for us to be here dedicated to the great task remaining before us, that from "
    "these honored dead we take increased devotion to that cause for which they gave the last full measure of "
    "devotion, that we here highly resolve that these dead shall not have died in vain, that this nation, under God, "
    "shall have a new birth of freedom, and that government of the people, by the people, for the people, shall not "
    "perish from the earth.")
CHAT = [
    {"role": "user", "content": f"Summarize this speech in two sentences.\n\n{GETTYSBURG}"},
    {"role": "assistant", "content": "At Gettysburg, Lincoln honors the soldiers who died to preserve a nation "
                                     "founded on equality. He asks the living to finish their work, so that "
                                     "government of, by and for the people endures."},
]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Give me three tips for learning to cook."]
NEW = 12  # new tokens per prompt in the generation test


@functools.cache
def get_smollm2() -> tuple[Path, Path] | str:
    """`(imported directory, GGUF file)` from tools/get_smollm2.sh, or why it could not fetch them."""
    proc = subprocess.run(["bash", str(ROOT / "tools" / "get_smollm2.sh")], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode == 3:  # the script's code for a failed download
        return f"SmolLM2 weights unavailable: {proc.stderr.strip().splitlines()[-1]}"
    if proc.returncode:
        raise RuntimeError(f"tools/get_smollm2.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    model = Path(proc.stdout.strip().splitlines()[-1])
    return model, model.parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_paths() -> tuple[Path, Path]:
    """`get_smollm2()`, or a skip of the calling test when there was no network to fetch it."""
    got = get_smollm2()
    if isinstance(got, str):
        pytest.skip(got)
    return got


@pytest.fixture(scope="session")
def smollm2() -> tuple[Path, Path]:
    """`(imported Hugging Face directory, GGUF file)`."""
    return smollm2_paths()


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """transformers' side on one thread: torch's OpenMP team spins when the cores are shared (with
    XLA's threads, other processes), measured 5-20x slower on 2 busy cores than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ours(smollm2):
    """jaxsft's model and tokenizer (`jaxsft.generate.LoadedModel`), float32."""
    return load_model(smollm2[0], dtype="float32")


@pytest.fixture(scope="module")
def hf(smollm2):
    """transformers' model of the imported directory, float32, eager attention."""
    return AutoModelForCausalLM.from_pretrained(smollm2[0], dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def chat_tokens(ours) -> np.ndarray:
    """The chat, rendered by the template and tokenized as training renders it (no added specials)."""
    text = ours.tokenizer.apply_chat_template(CHAT, tokenize=False)
    tokens = np.asarray(ours.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert 300 <= len(tokens) <= 512, len(tokens)
    return tokens


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens[None])).logits[0].numpy()


def test_logits_match_transformers(ours, hf, chat_tokens, record_property):
    graphdef, params = nnx.split(ours.model)
    forward = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg))
    tokens = chat_tokens[None]
    logits = np.asarray(forward(params, tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens)))[0]
    expected = hf_logits(hf, chat_tokens)
    diff, scale = float(np.abs(logits - expected).max()), float(np.abs(expected).max())
    record_property("max_logit_diff", diff)
    record_property("max_abs_logit", scale)
    print(f"SmolLM2 logits: max |jaxsft - transformers| = {diff:.3g}, max |logit| = {scale:.3g}")
    # Measured: 1.8e-4 against logits up to 39 (float32 rounding, summed in another order).
    assert diff <= 1e-3, (f"max |jaxsft - transformers| = {diff:.3g} over {len(chat_tokens)} tokens, "
                          f"max |logit| = {scale:.3g}")
    # The same next-token choice at (nearly) every position: the differences are rounding only.
    assert np.mean(logits.argmax(-1) == expected.argmax(-1)) >= 0.99


def test_greedy_generation_matches_transformers(ours, hf):
    """One batch, left-padded, against each prompt alone; both stop at the same stop tokens (the
    first answer is short enough to end with one)."""
    prompts = [render_prompt(ours.tokenizer, p) for p in PROMPTS]
    stops = ours.stop_ids
    got = decode(ours.model, prompts, GenerateConfig(max_new_tokens=NEW, batch_size=len(prompts)), stop_ids=stops)
    assert got[0][-1] in stops and all(len(ids) == NEW for ids in got[1:]), got
    for prompt, ids in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=stops,
                              pad_token_id=ours.tokenizer.pad_token_id)
        expected = out[0, len(prompt):].tolist()
        assert ids == expected, (ours.tokenizer.decode(ids), ours.tokenizer.decode(expected))


def test_a_few_training_steps_lower_the_loss(tmp_path, smollm2):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:4]))
    run_dir = tmp_path / "run"
    cfg = load_config(None, [
        f"model.path={smollm2[0]}", f"data.train={data}", "data.seq_len=128", "data.overlong=truncate_prompt",
        "train.steps=3", "train.batch_size=4",
        "train.log_every=1", "optimizer.schedule=constant", "checkpoint.every=100", "mesh.fsdp=1",
        f"run.dir={run_dir}", "run.export=", "run.plot=false", "run.tensorboard=false"])
    train(cfg, devices=jax.devices()[:1])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert losses[-1] < losses[0], losses


def test_import_equals_transformers_own_gguf_load(smollm2, hf, chat_tokens):
    hf_dir, gguf_file = smollm2
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert not [k for k in config if "quantiz" in k]
    assert (hf_dir / "generation_config.json").is_file()
    from safetensors import safe_open

    with safe_open(hf_dir / "model.safetensors", "np") as f:
        assert "lm_head.weight" not in f.keys()  # tied: the embedding is the head
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    theirs, mine = direct.state_dict(), hf.state_dict()
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in mine)
    tokens = chat_tokens[:128]  # the same weights: the same logits, bit for bit
    diff = float(np.abs(hf_logits(hf, tokens) - hf_logits(direct, tokens)).max())
    assert diff == 0.0, f"max |imported - GGUF| = {diff:.3g}"
    # The tokenizer too: the imported files render and tokenize as transformers' GGUF tokenizer does.
    mine_tok = AutoTokenizer.from_pretrained(hf_dir)
    their_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert mine_tok.chat_template and mine_tok.chat_template == their_tok.chat_template
    text = mine_tok.apply_chat_template(CHAT, tokenize=False)
    assert mine_tok(text)["input_ids"] == their_tok(text)["input_ids"]
    assert mine_tok.decode(mine_tok(GETTYSBURG, add_special_tokens=False)["input_ids"]) == GETTYSBURG
