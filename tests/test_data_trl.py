"""Token-for-token parity with Hugging Face TRL's `completion_only_loss` on the same data and tokenizer.

TRL's `SFTTrainer` is built (no training) on prompt/completion records; its dataset preparation
tokenizes each record and builds `labels` (-100 where the loss is masked). Our ids must equal its
`input_ids` and our trained tokens its non-masked labels, record by record.
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from conftest import DEMO_TRAIN, demo_texts
from make_tiny_model import train_tokenizer
from test_data_templates import FAMILIES, family_tokenizer
from jaxsft.data.render import Renderer

N = 150  # records compared per case


def _records(n: int = N) -> list[dict]:
    return [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def trl_prepared(model, tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """`(input_ids, labels)` per record, as TRL's SFTTrainer prepares them for completion-only loss."""
    args = SFTConfig(output_dir=tempfile.mkdtemp(), completion_only_loss=True, packing=False, max_length=None,
                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    return [(x["input_ids"], x["labels"]) for x in trainer.train_dataset]


def assert_same(tokenizer, ours_records: list[dict], trl: list[tuple[list[int], list[int]]]) -> None:
    renderer = Renderer(tokenizer)
    assert len(trl) == len(ours_records)
    for record, (input_ids, labels) in zip(ours_records, trl):
        ids, mask = renderer.render(record)
        assert ids.tolist() == input_ids
        trl_mask = (np.asarray(labels) != -100).astype(np.int32)
        assert mask.tolist() == trl_mask.tolist(), tokenizer.decode(ids[mask != trl_mask].tolist())
        assert mask.any()


def _conversational(records: list[dict], system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return [{"prompt": head + [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in records]


def test_chat_template_prompt_completion_matches_trl(model, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)  # ChatML template, eos <|im_end|>
    records = _records()
    trl = trl_prepared(model, tok, _conversational(records))
    assert_same(tok, _conversational(records), trl)
    # String records are rendered as one user turn and one assistant turn: the same tokens and mask.
    assert_same(tok, records, trl)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_templates_with_system_match_trl(model, name):
    tok = family_tokenizer(name)
    records = _conversational(_records(60), system="You extract orders as JSON.")
    assert_same(tok, records, trl_prepared(model, tok, records))


def test_no_chat_template_matches_trl(model):
    # A base model: no template; TRL appends eos to the completion and trains completion + eos.
    tok = train_tokenizer(demo_texts(), vocab_size=512, chat_template=False)
    records = _records()
    assert_same(tok, records, trl_prepared(model, tok, records))
