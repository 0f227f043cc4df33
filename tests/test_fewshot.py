"""Prompting baselines: the k-shot prompts, token by token, and the side-by-side report with its verdict.

The k-shot prompts are decoded and compared with the chat turns (or, without a chat template, the
plain text) they must hold: exactly K records of the training file, first the shuffle by train.seed
picks, the same for every prompt and every run, then the held-out prompt as training renders it.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import DEMO_EVAL, DEMO_TRAIN, demo_texts
from make_tiny_model import train_tokenizer
from jaxsft.cli import main
from jaxsft.config import load_config
from jaxsft.data.render import load_tokenizer
from jaxsft.evaluate import held_out, verdict
from jaxsft.fewshot import FewShot, choose_shots, train_order

K = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """`(train file, eval file)`: 12 demo training records and 5 held-out ones."""
    root = tmp_path_factory.mktemp("fewshot_data")
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:12]) + "\n")
    held.write_text("\n".join(DEMO_EVAL.read_text().splitlines()[:5]) + "\n")
    return train, held


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def config(model, data, *extra):
    return load_config(None, [f"model.path={model}", f"data.train={data[0]}", f"data.eval={data[1]}",
                              "train.seed=7", *extra])


def kshot_prompts(cfg, tokenizer, chat: bool, max_prompt=None) -> list:
    shots = choose_shots(cfg, K, chat)
    return held_out(cfg, tokenizer, 0, FewShot(tokenizer, cfg.data, shots, max_prompt))


def expected_shots(data) -> list[dict]:
    """The first K training records in the shuffle by train.seed 7."""
    train = records(data[0])
    return [train[int(i)] for i in train_order(len(train), 7)[:K]]


def test_kshot_chat_prompts_hold_k_training_examples(tiny_llama, data):
    cfg = config(tiny_llama, data)
    tokenizer = load_tokenizer(str(tiny_llama))
    items = kshot_prompts(cfg, tokenizer, chat=True)
    shots = expected_shots(data)
    eval_prompts = {r["prompt"] for r in records(data[1])}
    assert not eval_prompts & {s["prompt"] for s in shots}  # the shots are training records, not held-out ones
    turns = "".join(f"<|im_start|>user\n{s['prompt']}<|im_end|>\n<|im_start|>assistant\n{s['completion']}<|im_end|>\n"
                    for s in shots)
    assert len(items) == 5
    for item, record in zip(items, records(data[1])):
        text = tokenizer.decode(item.prompt_ids)
        assert item.shots == K and text.count("<|im_start|>assistant\n") == K + 1
        assert text == (f"<|begin_of_text|>{turns}<|im_start|>user\n{record['prompt']}<|im_end|>\n"
                        f"<|im_start|>assistant\n")
        assert item.reference == record["completion"]
    # The same prompts, token for token, when built again from scratch.
    again = kshot_prompts(config(tiny_llama, data), load_tokenizer(str(tiny_llama)), chat=True)
    assert [it.prompt_ids for it in again] == [it.prompt_ids for it in items]
    # With no shots the rewritten records render to exactly the zero-shot prompts.
    zero = held_out(cfg, tokenizer)
    none = held_out(cfg, tokenizer, 0, FewShot(tokenizer, cfg.data, [], None))
    assert [it.prompt_ids for it in none] == [it.prompt_ids for it in zero]
    # A limit on the prompt's tokens: the last shots are dropped, never the prompt.
    longest_zero = max(len(it.prompt_ids) for it in zero)
    fitted = kshot_prompts(cfg, tokenizer, chat=True, max_prompt=longest_zero + 150)
    assert all(it.shots == 1 and len(it.prompt_ids) <= longest_zero + 150 for it in fitted)
    assert all(it.shots == 0 and it.prompt_ids == z.prompt_ids
               for it, z in zip(kshot_prompts(cfg, tokenizer, chat=True, max_prompt=5), zero))


def test_kshot_plain_prefix_without_chat_template(data):
    tokenizer = train_tokenizer(demo_texts(200), vocab_size=512, chat_template=False)
    cfg = config("unused", data)
    items = kshot_prompts(cfg, tokenizer, chat=False)
    prefix = "".join(s["prompt"] + s["completion"] + "\n\n" for s in expected_shots(data))
    for item, record in zip(items, records(data[1])):
        assert item.shots == K
        assert tokenizer.decode(item.prompt_ids) == f"<|begin_of_text|>{prefix}{record['prompt']}"


def test_verdict_wording():
    def report(**values):
        return {"num_prompts": 200, "models": {k: {"loss": 1.0, "metrics": {"exact_match": v, "json_valid": 0.0}}
                                               for k, v in values.items()}}
    assert verdict(report(**{"base zero-shot": 0.05, "base 3-shot": 0.17, "fine-tuned": 0.78})) == \
        "fine-tuned beats 3-shot prompting by 61.0 points of exact_match on 200 held-out prompts"
    assert verdict(report(**{"base zero-shot": 0.5, "base 3-shot": 0.2, "fine-tuned": 0.4})) == \
        "fine-tuned loses to zero-shot prompting by 10.0 points of exact_match on 200 held-out prompts"
    assert verdict(report(**{"zero-shot": 0.1, "3-shot": 0.1})) == \
        "3-shot prompting ties with zero-shot prompting at 10.0% exact_match on 200 held-out prompts"
    assert verdict(report(baseline=0.0, **{"fine-tuned": 0.785})) == \
        "fine-tuned beats the baseline by 78.5 points of exact_match on 200 held-out prompts"
    assert verdict(report(model=0.3)) == ""


def test_eval_cli_zero_shot_k_shot_fine_tuned(tiny_llama, data, tmp_path, capsys):
    settings = {"model": {"path": str(tiny_llama)}, "data": {"train": str(data[0]), "eval": str(data[1])},
                "train": {"batch_size": 8, "seed": 7},
                "eval": {"metrics": ["exact_match", "json_valid"], "num_generations": 4, "max_new_tokens": 4,
                         "batch_size": 4, "examples": 1}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(settings))
    out = tmp_path / "report"
    # The "fine-tuned" model is the base model itself here: its column must equal the zero-shot one.
    assert main(["eval", str(path), "--model", str(tiny_llama), "--baseline", str(tiny_llama), "--few-shot", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval_report.json").read_text())
    models = report["models"]
    assert list(models) == ["base zero-shot", "base 2-shot", "fine-tuned"]
    assert {k: set(m["metrics"]) for k, m in models.items()} == {k: {"exact_match", "json_valid"} for k in models}
    zero, kshot, tuned = models.values()
    assert tuned["loss"] == pytest.approx(zero["loss"]) and tuned["metrics"] == zero["metrics"]
    # The k-shot loss is over the same answer tokens, with the shots before them.
    assert kshot["trained_tokens"] == zero["trained_tokens"] and kshot["loss"] != pytest.approx(zero["loss"])
    shots = kshot["few_shot"]
    assert shots["k"] == 2 and shots["fewer_shots"] == 0 and shots["max_prompt_tokens"] == 2048 - 4
    assert shots["shots"] == [f"{data[0]}:{int(i) + 1}" for i in train_order(12, 7)[:2]]
    assert shots["first_prompt"].count("<|im_start|>assistant\n") == 3
    md = (out / "eval_report.md").read_text()
    assert md in printed
    assert (f"| metric | base zero-shot (`{tiny_llama}`) | base 2-shot (`{tiny_llama}`) | fine-tuned (`{tiny_llama}`) |"
            in md)
    assert "| exact_match |" in md and "| json_valid |" in md and "## The first base 2-shot prompt" in md
    assert md.rstrip().splitlines()[-1] == f"Verdict: {report['verdict']}."
    assert report["verdict"].startswith("fine-tuned ties with ") and report["verdict"].endswith(
        " on 4 held-out prompts")
