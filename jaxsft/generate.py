"""Generation: batched KV-cache decoding with the training decoder, prompts rendered as in training.

    model = load_model("runs/demo")                      # a run directory, checkpoint or HF directory
    texts = model.generate([model.prompt("Extract ...")], GenerateConfig(max_new_tokens=64))

Prompts of different lengths are padded (on the left by default; right padding gives the same
tokens) into one `[B, P]` batch, with P rounded up to a bucket so that few shapes compile. One
jitted function then runs the prefill (all prompt tokens at once, filling a `KVCache` of
`P + max_new_tokens` slots) and a `lax.while_loop` of one-token decode steps that ends when every
row has produced a stop token (eos or an end-of-turn token) or `max_new_tokens`. The layer math is
`jaxsft.models.decoder`'s own (its cached path), so sliding windows, soft-caps and per-layer RoPE
are those of training. Stop strings are applied to the decoded text afterwards.

Sampling: greedy (`temperature=0`), or temperature with optional top-k and top-p (nucleus).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxsft import parallel
from jaxsft.config import GenerateConfig
from jaxsft.data.render import load_tokenizer
from jaxsft.data.tokens import Tokens
from jaxsft.errors import JaxsftError
from jaxsft.models import DTYPES, CausalLM, abstract_model, from_pretrained
from jaxsft.models.decoder import KVCache
from jaxsft.rundir import run_source
from jaxsft.runmodel import load_checkpoint

# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Gemma, Phi-3),
# besides the tokenizer's eos: generation stops at any of them that the vocabulary has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|end_of_text|>")
PROMPT_BUCKET = 64  # prompt batches are padded to a multiple of this many tokens


# --------------------------------------------------------------------------- sampling


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """One token id per row of `logits [B, V]`: the argmax when `temperature == 0`, else a draw
    from softmax(logits / temperature) restricted to the top-k tokens and to the smallest set of
    most likely tokens whose probability reaches top-p."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # a token is kept while the mass before it < top_p
        cutoff = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=32)
def _decoder(graphdef: nnx.GraphDef, max_new: int, sampling: tuple, stop_ids: tuple[int, ...], pad_id: int,
             mesh: jax.sharding.Mesh | None):
    """The jitted `(params, tokens [B,P], valid [B,P], key) -> new tokens [B, max_new]` (pad after a stop)."""
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def run(params, tokens, valid, key):
        model = nnx.merge(graphdef, params)
        b, p = tokens.shape
        lengths = valid.sum(axis=1)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        cache = KVCache.empty(model.args, b, p + max_new)
        hidden, cache = model.decode(tokens, positions, valid, cache)  # prefill
        last = p - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # each row's last prompt slot (left or right padded)
        key, sub = jax.random.split(key)
        token = sample(model.logits(hidden[jnp.arange(b), last]), sub, *sampling)

        def cond(state):
            i, _, _, done, _, _ = state
            return (i < max_new) & ~jnp.all(done)

        def step(state):
            i, cache, token, done, out, key = state
            out = out.at[:, i].set(jnp.where(done, pad_id, token))
            done = done | jnp.isin(token, stops)
            hidden, cache = model.decode(token[:, None], (lengths + i)[:, None], jnp.ones((b, 1), jnp.int32),
                                                cache)
            key, sub = jax.random.split(key)
            return i + 1, cache, sample(model.logits(hidden[:, 0]), sub, *sampling), done, out, key

        state = (jnp.zeros((), jnp.int32), cache, token, jnp.zeros((b,), bool),
                 jnp.full((b, max_new), pad_id, jnp.int32), key)
        return jax.lax.while_loop(cond, step, state)[4]

    if mesh is None:
        return jax.jit(run)

    def on_mesh(*a):
        with parallel.activation_sharding(mesh):
            return run(*a)
    return jax.jit(on_mesh)


def decode(model: CausalLM, prompts: Sequence[Sequence[int]], cfg: GenerateConfig = GenerateConfig(), *,
           stop_ids: Sequence[int] = (), pad_id: int = 0, mesh: jax.sharding.Mesh | None = None,
           padding: str = "left") -> list[list[int]]:
    """New token ids for each prompt (token ids), in batches of `cfg.batch_size` rows (at most the
    prompt count; rounded up to a multiple of the mesh's data-parallel size), each ending with its
    stop token when it produced one. On a mesh every process passes the same prompts.

    Prompts are sorted by length before batching (less padding) and returned in input order;
    row `i` of batch `j` samples with a key derived from `cfg.seed` and `j`.
    """
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    if any(len(p) == 0 for p in prompts):
        raise JaxsftError("cannot generate from an empty prompt")
    graphdef, params = nnx.split(model)
    sampling = (cfg.temperature, cfg.top_k, cfg.top_p)
    run = _decoder(graphdef, cfg.max_new_tokens, sampling, tuple(sorted(set(stop_ids))), pad_id, mesh)
    stops = set(stop_ids)
    batch = min(cfg.batch_size, len(prompts))  # no rows of padding beyond the prompts there are
    if mesh is not None:  # whole rows on each data-parallel shard
        dp = parallel.data_parallel_size(mesh)
        batch = -(-batch // dp) * dp
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, list[int]] = {}
    for j, start in enumerate(range(0, len(order), batch)):
        rows = order[start:start + batch]
        rows_full = rows + [rows[-1]] * (batch - len(rows))  # a fixed batch: one compile per bucket
        width = -(-max(len(prompts[i]) for i in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens = np.full((len(rows_full), width), pad_id, np.int32)
        valid = np.zeros_like(tokens)
        for r, i in enumerate(rows_full):
            n = len(prompts[i])
            at = slice(width - n, width) if padding == "left" else slice(0, n)
            tokens[r, at], valid[r, at] = prompts[i], 1
        if mesh is not None:  # every process holds the whole batch and places its own shards of it
            sharding = parallel.batch_sharding(mesh)
            tokens, valid = (jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i])
                             for x in (tokens, valid))
        out = run(params, tokens, valid, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), j))
        out = np.asarray(out if out.is_fully_addressable else multihost_utils.process_allgather(out, tiled=True))
        for r, i in enumerate(rows):
            ids = out[r].tolist()
            cut = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
            results[i] = ids[:cut]
    return [results[i] for i in range(len(prompts))]


# --------------------------------------------------------------------------- text in, text out


def stop_token_ids(tokenizer, model_dir: str | Path | None = None) -> list[int]:
    """The ids generation stops at: the tokenizer's eos, `generation_config.json`'s eos ids, and the
    end-of-turn tokens of common chat templates that the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if gen_path is not None and gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def render_prompt(tokenizer, prompt: str | list[dict], system: str | None = None) -> list[int]:
    """The token ids a model sees before it answers, rendered as `jaxsft.data.render` renders the
    prompt of a training example: the chat template with the generation prompt (tokenized without
    added special tokens: the template writes them), or without a template the tokenizer's own
    special tokens then the text (`system` first, a blank line after it)."""
    tokens = Tokens(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system:
            messages = [{"role": "system", "content": system}] + messages
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokens.encode(text)
    if not isinstance(prompt, str):
        raise JaxsftError("this prompt holds messages, but the tokenizer has no chat template to render them with")
    return tokens.encode(f"{system}\n\n{prompt}" if system else prompt, special=True)


def apply_stop_strings(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


@dataclasses.dataclass
class LoadedModel:
    """A model ready to generate: the NNX model, its tokenizer, its stop tokens, where it came from."""

    model: CausalLM
    tokenizer: Any
    stop_ids: list[int]
    source: str
    run_dir: Path | None = None  # the run directory, when loaded from a run or checkpoint
    mesh: jax.sharding.Mesh | None = None

    def prompt(self, prompt: str | list[dict], system: str | None = None) -> list[int]:
        """Token ids of a prompt (a user message or a conversation), rendered as in training."""
        return render_prompt(self.tokenizer, prompt, system)

    def generate_ids(self, prompts: Sequence[Sequence[int]], cfg: GenerateConfig = GenerateConfig()) -> list[list[int]]:
        """New token ids for each prompt (see `decode`)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return decode(self.model, prompts, cfg, stop_ids=self.stop_ids, pad_id=pad, mesh=self.mesh)

    def text(self, ids: Sequence[int], cfg: GenerateConfig = GenerateConfig()) -> str:
        """Generated ids as text: special tokens dropped, cut at the first stop string."""
        return apply_stop_strings(self.tokenizer.decode(list(ids), skip_special_tokens=True), cfg.stop)

    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerateConfig = GenerateConfig()) -> list[str]:
        """The generated text for each prompt (token ids)."""
        return [self.text(ids, cfg) for ids in self.generate_ids(prompts, cfg)]


def load_model(source: str | Path, mesh: jax.sharding.Mesh | None = None, dtype: str = "float32",
               compute_dtype: str | None = None) -> LoadedModel:
    """Loads a Hugging Face directory (in `dtype`), a run directory (its newest checkpoint) or one
    checkpoint directory (in the run's dtype), with its tokenizer, placed on `mesh` when given."""
    if run_source(source) is not None:
        run_dir, _, args, params = load_checkpoint(source)
        graphdef, abstract_state = nnx.split(abstract_model(args))
        if mesh is not None:
            params = jax.device_put(params, parallel.param_shardings(abstract_state, mesh))
        model, model_dir = nnx.merge(graphdef, params), run_dir / "hf"
    else:
        run_dir, model_dir = None, Path(source)
        model = from_pretrained(model_dir, DTYPES[dtype], compute_dtype=compute_dtype or dtype, mesh=mesh)
    tokenizer = load_tokenizer(str(model_dir))
    return LoadedModel(model, tokenizer, stop_token_ids(tokenizer, model_dir), str(source), run_dir, mesh)


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records of a JSONL/Parquet file: `{"prompt": str | messages, "system"?: str}` or
    `{"messages": [...]}` (a trailing assistant message is left out: it is the answer)."""
    from jaxsft.data.sources import open_source

    source = open_source([str(path)], "--file")
    records = []
    for i in range(len(source)):
        record = source[i]
        if "messages" in record:
            messages = [m for m in record["messages"]]
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            records.append({"prompt": messages, "system": None, "_where": record["_where"]})
        elif isinstance(record.get("prompt"), (str, list)):
            records.append({"prompt": record["prompt"], "system": record.get("system"), "_where": record["_where"]})
        else:
            raise JaxsftError(f"{record['_where']}: record has neither a 'prompt' nor a 'messages' field")
    return records


def generate_main(source: str, prompt: str | None, file: str | None, cfg: GenerateConfig,
                  system: str | None = None) -> list[dict]:
    """`jaxsft generate`: one prompt (its text is printed) or a file of them (one JSON line each,
    the record's `system` kept). `system` is the system prompt of `prompt`, and of the file's
    records that have none."""
    if (prompt is None) == (file is None):
        raise JaxsftError("give exactly one of --prompt TEXT or --file PROMPTS.jsonl")
    loaded = load_model(source)
    records = [{"prompt": prompt, "system": system}] if prompt is not None else read_prompts(file)
    for r in records:
        if r.get("system") is None and system is not None and not isinstance(r["prompt"], list):
            r["system"] = system
    ids = [loaded.prompt(r["prompt"], r.get("system")) for r in records]
    texts = loaded.generate(ids, cfg)
    results = [{"prompt": r["prompt"], **({"system": r["system"]} if r.get("system") is not None else {}),
                "generation": t} for r, t in zip(records, texts)]
    if prompt is not None:
        print(texts[0])
    else:
        for result in results:
            print(json.dumps(result, ensure_ascii=False))
    return results
