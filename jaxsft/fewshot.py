"""Few-shot prompting: training examples shown to the base model before each held-out prompt.

The prompting baselines of `jaxsft eval --few-shot K` (and `jaxsft curve`): K examples of
`data.train`, the first usable records of `train_order` (one shuffle seeded by `train.seed`; the
learning curve's nested subsets come from the same order), the same for every prompt, rendered as
earlier user/assistant turns with the model's chat template, or without one as plain text (each
example's prompt and completion, then a blank line). A prompt that would leave fewer than
`eval.max_new_tokens` positions of the model's `max_position_embeddings` holds fewer shots.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsft.config import Config, DataConfig, EvalConfig, FieldsConfig
from jaxsft.data.render import Renderer, normalize
from jaxsft.data.sources import open_source
from jaxsft.errors import ConfigError
from jaxsft.generate import LoadedModel
from jaxsft.models import read_hf_config


def answer_span(mask: np.ndarray) -> tuple[int, int] | None:
    """`(start, end)` of the last run of trained tokens; None when nothing is trained or nothing
    comes before it to prompt with."""
    trained = np.flatnonzero(mask)
    if not len(trained):
        return None
    end = trained[-1] + 1
    untrained = np.flatnonzero(mask[:end] == 0)
    start = untrained[-1] + 1 if len(untrained) else 0
    return (int(start), int(end)) if start else None


def train_order(n: int, seed: int) -> np.ndarray:
    """The one shuffle of `n` training records (by `train.seed`) that the few-shot examples and the
    learning curve's nested subsets are taken from, in this order."""
    return np.random.default_rng(seed).permutation(n)


@dataclasses.dataclass
class Shot:
    """A training example shown before the real prompt: its chat turns (the prompt's turns without
    a system message, then the answer), and `prompt + completion` as plain text (None unless both
    are strings) for tokenizers without a chat template."""

    where: str
    messages: list[dict]
    text: str | None


def _turns(value, role: str, fields: FieldsConfig, where: str) -> list[dict]:
    """A prompt or completion (a string, or messages named by `fields`) as chat messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return normalize({fields.messages: value, "_where": where}, "messages", fields)["messages"]


def _conversation(x: dict, fields: FieldsConfig, where: str) -> tuple[list[dict], list[dict]]:
    """A normalized prompt/completion or messages record as `(the turns before its last answer, that answer)`."""
    if x["kind"] == "messages":
        messages = x["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], [messages[last]]
    system = [{"role": "system", "content": x["system"]}] if x["system"] else []
    return system + _turns(x["prompt"], "user", fields, where), _turns(x["completion"], "assistant", fields, where)


def choose_shots(cfg: Config, k: int, chat: bool) -> list[Shot]:
    """`k` examples of `data.train`: the first usable records of `train_order` (a prompt and an
    answer, no tools; without a chat template (`chat` false), string prompt and completion)."""
    source = open_source(cfg.data.train, "data.train")
    shots = []
    for i in train_order(len(source), cfg.train.seed):
        if len(shots) == k:
            break
        record = source[int(i)]
        x = normalize(record, cfg.data.schema, cfg.data.fields)
        if x["kind"] == "text" or x["blank"] or x["tools"]:
            continue
        plain = x["kind"] == "prompt_completion" and isinstance(x["prompt"], str) and isinstance(x["completion"], str)
        if not (chat or plain):
            continue
        before, answer = _conversation(x, cfg.data.fields, record["_where"])
        # Each held-out prompt keeps its own system message, first; the shots' own are left out.
        messages = [m for m in before if m["role"] != "system"] + answer
        shots.append(Shot(record["_where"], messages, x["prompt"] + x["completion"] if plain else None))
    if len(shots) < k:
        raise ConfigError(f"config key 'eval.few_shot' is {k}, but data.train has only {len(shots)} records usable "
                          f"as examples (a prompt and an answer{'' if chat else ', both strings'})")
    return shots


class FewShot:
    """Held-out records rewritten with shots before their prompt, rendered as in training.

    A rewritten record is a canonical prompt/completion record: with a chat template, the prompt is
    the record's system message, the shots' turns, then its own turns before the answer; without
    one, the shots' text (each followed by a blank line) before the prompt string.
    """

    def __init__(self, tokenizer, data: DataConfig, shots: list[Shot], max_prompt: int | None):
        self.data, self.shots, self.max_prompt = data, shots, max_prompt
        # How the rewritten records are read: canonical field names, only the answer trained.
        self.rewritten_data = dataclasses.replace(data, schema="prompt_completion", fields=FieldsConfig(),
                                                  train_on_prompt=False)
        self.renderer = Renderer(tokenizer, self.rewritten_data)
        self.longest = 0  # tokens of the longest rewritten record, for its loss

    def record(self, record: dict, k: int) -> dict:
        """`record` rewritten with the first `k` shots."""
        x = normalize(record, self.data.schema, self.data.fields)
        where, shots = record["_where"], self.shots[:k]
        if not self.renderer.has_template:
            return {"prompt": "".join(s.text + "\n\n" for s in shots) + x["prompt"], "completion": x["completion"],
                    "system": x["system"], "_where": where}
        before, answer = _conversation(x, self.data.fields, where)
        lead = next((i for i, m in enumerate(before) if m["role"] != "system"), len(before))
        prompt = before[:lead] + [m for s in shots for m in s.messages] + before[lead:]
        return {"prompt": prompt, "completion": answer, "tools": x["tools"], "_where": where}

    def prompt(self, record: dict) -> tuple[list[int], dict, int]:
        """`(prompt ids, rewritten record, shots used)`: as many shots as leave the prompt at most
        `max_prompt` tokens (all of them when there is no limit)."""
        for k in range(len(self.shots), -1, -1):
            rewritten = self.record(record, k)
            ids, mask = self.renderer.render(rewritten)
            start = answer_span(mask)[0]
            if self.max_prompt is None or start <= self.max_prompt or k == 0:
                self.longest = max(self.longest, len(ids))
                return ids[:start].tolist(), rewritten, k


def max_prompt_tokens(loaded: LoadedModel, cfg: EvalConfig) -> int | None:
    """The longest prompt that leaves `max_new_tokens` positions within the model's
    `max_position_embeddings`; None when its config.json does not say."""
    hf = read_hf_config(loaded.run_dir / "hf" if loaded.run_dir else loaded.source)
    limit = hf.get("max_position_embeddings") or (hf.get("text_config") or {}).get("max_position_embeddings")
    return max(int(limit) - cfg.max_new_tokens, 1) if limit else None
