"""Data: JSONL records -> rendered, loss-masked examples -> packed rows -> deterministic, resumable batches."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_tiny_model import IM_END, END_OF_TEXT, train_tokenizer  # noqa: E402

from jaxsft.config import DataConfig  # noqa: E402
from jaxsft.data.pack import BATCH_KEYS, pack_list  # noqa: E402
from jaxsft.data.pipeline import _examples, train_dataset  # noqa: E402
from jaxsft.data.render import Renderer, to_example  # noqa: E402
from jaxsft.data.sources import JsonlSource  # noqa: E402
from jaxsft.errors import DataError  # noqa: E402

DEMO_TRAIN = ROOT / "configs" / "demo_data" / "train.jsonl"


def _records(limit: int | None = None) -> list[dict]:
    lines = DEMO_TRAIN.read_text().splitlines()
    return [json.loads(line) for line in lines[:limit] if line.strip()]


def _texts(limit: int = 400) -> list[str]:
    return [t for r in _records(limit) for t in (r["prompt"], r["completion"])]


@pytest.fixture(scope="module")
def chat_tok():
    tok = train_tokenizer(_texts(), vocab_size=512, chat_template=True)
    assert tok.eos_token == IM_END and tok.chat_template
    return tok


@pytest.fixture(scope="module")
def base_tok():
    tok = train_tokenizer(_texts(), vocab_size=512, chat_template=False)
    assert tok.eos_token == END_OF_TEXT and not tok.chat_template
    return tok


RECORD = {"prompt": "Extract the order as JSON.\nAna Silva | 3 teal mugs | $12.50 | May 2, 2025",
          "completion": '{"name": "Ana Silva", "item": "mug", "quantity": 3}'}


# --- rendering and the loss mask ---------------------------------------------------------------

def test_render_chat_template_mask(chat_tok):
    tok = chat_tok
    ids, mask = Renderer(tok).render(RECORD)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    assert set(np.unique(mask)) == {0, 1}
    P, C = RECORD["prompt"], RECORD["completion"]

    # Trained: exactly the completion and the end-of-turn token closing it.
    assert tok.decode(ids[mask == 1]) == C + IM_END
    assert ids[mask == 1][-1] == tok.eos_token_id
    # The trained tokens are one contiguous run, followed only by untrained template tail.
    trained_at = np.flatnonzero(mask)
    assert np.array_equal(trained_at, np.arange(trained_at[0], trained_at[-1] + 1))

    user = [{"role": "user", "content": P}]
    prompt_text = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt_text == f"<|begin_of_text|><|im_start|>user\n{P}<|im_end|>\n<|im_start|>assistant\n"
    # Untrained: the prompt as rendered alone (with the generation prompt), then the trailing "\n".
    assert tok.decode(ids[mask == 0]) == prompt_text + "\n"
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert list(ids[: len(prompt_ids)]) == prompt_ids
    assert list(ids[mask == 0][: len(prompt_ids)]) == prompt_ids
    assert not mask[: len(prompt_ids)].any()
    # Whole sequence decodes to the full chat rendering.
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": C}], tokenize=False)
    assert tok.decode(ids) == full


def test_render_without_chat_template(base_tok):
    tok = base_tok
    ids, mask = Renderer(tok).render(RECORD)
    P, C = RECORD["prompt"], RECORD["completion"]
    assert tok.decode(ids[mask == 1]) == C + END_OF_TEXT
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1
    prompt = ids[mask == 0]
    assert prompt[0] == tok.bos_token_id
    assert tok.decode(prompt[1:]) == P
    assert tok.decode(prompt, skip_special_tokens=False) == tok.bos_token + P
    # prompt first, completion after: the mask is 0...0 1...1
    n0 = int((mask == 0).sum())
    assert not mask[:n0].any() and mask[n0:].all()


def test_render_every_demo_record(chat_tok):
    renderer = Renderer(chat_tok)
    for r in _records(50):
        ids, mask = renderer.render(r)
        assert chat_tok.decode(ids[mask == 1]) == r["completion"] + IM_END


def test_renderer_requires_eos():
    class NoEos:
        chat_template = None
        eos_token_id = None

    with pytest.raises(DataError, match="eos"):
        Renderer(NoEos())


# --- to_example --------------------------------------------------------------------------------

def test_to_example_shifts():
    ids = np.arange(10, 20, dtype=np.int32)
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0], np.int32)
    ex = to_example(ids, mask, seq_len=64, overlong="truncate")
    assert set(ex) == {"tokens", "targets", "loss_mask"}
    assert np.array_equal(ex["tokens"], ids[:-1])
    assert np.array_equal(ex["targets"], ids[1:])
    assert np.array_equal(ex["loss_mask"], mask[1:])
    # exactly seq_len + 1 ids fit without truncation
    ex = to_example(ids, mask, seq_len=9, overlong="drop")
    assert ex is not None and len(ex["tokens"]) == 9


def test_to_example_overlong_truncate_vs_drop():
    ids = np.arange(100, 130, dtype=np.int32)
    mask = np.zeros(30, np.int32)
    mask[5:] = 1
    ex = to_example(ids, mask, seq_len=16, overlong="truncate")
    assert np.array_equal(ex["tokens"], ids[:16])
    assert np.array_equal(ex["targets"], ids[1:17])
    assert np.array_equal(ex["loss_mask"], mask[1:17])
    assert to_example(ids, mask, seq_len=16, overlong="drop") is None


def test_to_example_nothing_trained_after_truncation():
    ids = np.arange(30, dtype=np.int32)
    mask = np.zeros(30, np.int32)
    mask[20:] = 1  # every trained target lies beyond seq_len
    assert to_example(ids, mask, seq_len=16, overlong="truncate") is None
    # a mask on the first id only is never a target
    first_only = np.zeros(30, np.int32)
    first_only[0] = 1
    assert to_example(ids, first_only, seq_len=64, overlong="truncate") is None


# --- packing -----------------------------------------------------------------------------------

def _synthetic_examples(n: int = 30, seq_len: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(1, seq_len + 1, size=n - 2)) + [seq_len, 1]  # include the extremes
    examples = []
    for i, n_tokens in enumerate(lengths):
        ids = rng.integers(5, 1000, size=int(n_tokens) + 1).astype(np.int32)
        ids[0] = 1000 + i  # unique first token: every example is distinct
        mask = (rng.random(n_tokens + 1) < 0.6).astype(np.int32)
        mask[-1] = 1  # at least one trained target
        ex = to_example(ids, mask, seq_len, "truncate")
        assert ex is not None and len(ex["tokens"]) == n_tokens
        examples.append(ex)
    return examples


def _segments(row: dict) -> list[dict]:
    out = []
    for seg in np.unique(row["segment_ids"]):
        if seg == 0:
            continue
        at = row["segment_ids"] == seg
        out.append({k: row[k][at] for k in ("tokens", "targets", "loss_mask", "positions")} |
                   {"where": np.flatnonzero(at)})
    return out


def test_pack_list_contract():
    seq_len = 64
    examples = _synthetic_examples(30, seq_len)
    rows = pack_list(examples, seq_len, num_bins=8)
    assert rows
    assert sum(len(e["tokens"]) for e in examples) <= len(rows) * seq_len
    # best-fit packs densely: far fewer rows than examples
    assert len(rows) < len(examples)

    originals = {tuple(e["tokens"]): e for e in examples}
    seen = collections.Counter()
    for row in rows:
        assert set(row) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert row[k].shape == (seq_len,) and row[k].dtype == np.int32, k
        seg = row["segment_ids"]
        # segment ids: 1, 2, ... in order, contiguous, with 0 only as a padding tail
        nonpad = int((seg != 0).sum())
        assert (seg[:nonpad] != 0).all() and (seg[nonpad:] == 0).all()
        assert (np.diff(seg[:nonpad]) >= 0).all()
        assert set(seg[:nonpad]) == set(range(1, seg.max() + 1))
        # padding trains nothing and holds no tokens
        for k in ("tokens", "targets", "loss_mask", "positions"):
            assert not row[k][nonpad:].any(), k

        for s in _segments(row):
            assert np.array_equal(s["where"], np.arange(s["where"][0], s["where"][-1] + 1))  # contiguous
            assert np.array_equal(s["positions"], np.arange(len(s["tokens"])))  # restart at 0, +1 each
            key = tuple(s["tokens"])
            assert key in originals, "a packed segment is not one of the input examples"
            orig = originals[key]
            # the segment carries the example's own targets and mask: no target crosses into the
            # next segment (its last target is its own next token, not the next example's first)
            assert np.array_equal(s["targets"], orig["targets"])
            assert np.array_equal(s["loss_mask"], orig["loss_mask"])
            seen[key] += 1
    # every example appears exactly once
    assert seen == collections.Counter(originals.keys())


def test_pack_list_keeps_segment_boundaries():
    # Two examples whose next-token at the boundary would differ if targets were shifted after packing.
    a = to_example(np.array([7, 8, 9], np.int32), np.array([0, 1, 1], np.int32), 16, "truncate")
    b = to_example(np.array([20, 21, 22, 23], np.int32), np.array([0, 0, 1, 1], np.int32), 16, "truncate")
    (row,) = pack_list([a, b], 16)
    assert list(row["segment_ids"][:5]) == [1, 1, 2, 2, 2]
    assert list(row["tokens"][:5]) == [7, 8, 20, 21, 22]
    assert list(row["targets"][:5]) == [8, 9, 21, 22, 23]  # not 8, 20, ...
    assert list(row["loss_mask"][:5]) == [1, 1, 0, 1, 1]
    assert list(row["positions"][:5]) == [0, 1, 0, 1, 2]


# --- the training pipeline ---------------------------------------------------------------------

SEQ_LEN, LOCAL_BATCH = 256, 4


def _cfg(**kw) -> DataConfig:
    return DataConfig(**({"train": (str(DEMO_TRAIN),), "seq_len": SEQ_LEN} | kw))


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)


def test_train_dataset_batches(chat_tok):
    it = iter(train_dataset(_cfg(), chat_tok, seed=0, local_batch=LOCAL_BATCH))
    completions = {r["completion"] for r in _records()}
    for batch in _take(it, 3):
        assert set(batch) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert batch[k].shape == (LOCAL_BATCH, SEQ_LEN), k
            assert batch[k].dtype == np.int32, k
        assert batch["loss_mask"].sum() > 0
        assert not batch["loss_mask"][batch["segment_ids"] == 0].any()
        for row in (dict(zip(BATCH_KEYS, vals)) for vals in zip(*(batch[k] for k in BATCH_KEYS))):
            segs = _segments(row)
            assert len(segs) >= 1
            for s in segs:
                assert np.array_equal(s["positions"], np.arange(len(s["tokens"])))
                # each packed example trains exactly one demo completion and its end-of-turn
                trained = chat_tok.decode(s["targets"][s["loss_mask"] == 1])
                assert trained.endswith(IM_END) and trained[: -len(IM_END)] in completions
                assert s["tokens"][0] == chat_tok.bos_token_id


def test_train_dataset_deterministic(chat_tok):
    cfg = _cfg()
    a = _take(iter(train_dataset(cfg, chat_tok, seed=0, local_batch=LOCAL_BATCH)), 3)
    b = _take(iter(train_dataset(cfg, chat_tok, seed=0, local_batch=LOCAL_BATCH)), 3)
    c = _take(iter(train_dataset(cfg, chat_tok, seed=1, local_batch=LOCAL_BATCH)), 3)
    assert _same(a, b)
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_train_dataset_exact_resume(chat_tok):
    cfg = _cfg()
    it = iter(train_dataset(cfg, chat_tok, seed=0, local_batch=LOCAL_BATCH))
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 5)
    fresh = iter(train_dataset(cfg, chat_tok, seed=0, local_batch=LOCAL_BATCH))
    fresh.set_state(state)
    assert _same(_take(fresh, 5), expected)
    # and the resumed batches are not simply the first ones again
    first = _take(iter(train_dataset(cfg, chat_tok, seed=0, local_batch=LOCAL_BATCH)), 5)
    assert not _same(first, expected)


def _prompt_of(tok, example: dict) -> str:
    text = tok.decode(example["tokens"])
    start = text.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    return text[start:text.index(IM_END, start)]


def test_process_shards_are_disjoint(chat_tok):
    cfg = _cfg()
    source = JsonlSource(cfg.train)
    renderer = Renderer(chat_tok)
    shards = []
    for index in (0, 1):
        ds = _examples(source, renderer, cfg, index, 2, seed=None, repeat=False)
        shards.append([_prompt_of(chat_tok, ex) for ex in ds])
    all_prompts = [r["prompt"] for r in _records()]
    assert len(set(all_prompts)) == len(all_prompts)  # the check below relies on unique prompts
    assert len(shards[0]) == len(shards[1]) == len(all_prompts) // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(all_prompts)
    # unshuffled, each process takes every other record from its index
    assert shards[0][:3] == all_prompts[0:6:2] and shards[1][:3] == all_prompts[1:6:2]


def test_shuffled_epochs_cover_every_record(chat_tok, tmp_path):
    path = tmp_path / "small.jsonl"
    records = _records(10)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = _cfg(train=(str(path),))
    ds = _examples(JsonlSource(cfg.train), Renderer(chat_tok), cfg, 0, 1, seed=0, repeat=True)
    prompts = [_prompt_of(chat_tok, ds[i]) for i in range(30)]
    epochs = [prompts[i:i + 10] for i in (0, 10, 20)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(r["prompt"] for r in records)
    assert epochs[0] != [r["prompt"] for r in records]  # shuffled at all
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled across epochs
    # the record order follows the seed (not only the packer's bin order)
    other = _examples(JsonlSource(cfg.train), Renderer(chat_tok), cfg, 0, 1, seed=1, repeat=True)
    assert [_prompt_of(chat_tok, other[i]) for i in range(10)] != epochs[0]
    again = _examples(JsonlSource(cfg.train), Renderer(chat_tok), cfg, 0, 1, seed=0, repeat=True)
    assert [_prompt_of(chat_tok, again[i]) for i in range(30)] == prompts


# --- JsonlSource errors ------------------------------------------------------------------------

GOOD = json.dumps({"prompt": "p", "completion": "c"})


@pytest.mark.parametrize("bad_line, expected", [
    ('{"prompt": "p", "completion": ', "not valid JSON"),
    (json.dumps({"prompt": "p"}), "completion"),
    (json.dumps({"prompt": 3, "completion": "c"}), "prompt"),
    (json.dumps({"prompt": "p", "completion": "  "}), "empty"),
    (json.dumps(["p", "c"]), "JSON object"),
], ids=["malformed", "no-completion", "non-string-prompt", "empty-completion", "not-an-object"])
def test_jsonl_source_bad_record_names_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")  # blank line 2: numbering counts it
    with pytest.raises(DataError) as e:
        JsonlSource([path])
    msg = str(e.value)
    assert f"{path}:3" in msg
    assert expected in msg


def test_jsonl_source_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match="no records") as e:
        JsonlSource([path])
    assert str(path) in str(e.value)


def test_jsonl_source_empty_second_file(tmp_path):
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text(GOOD + "\n")
    empty.write_text("")
    with pytest.raises(DataError) as e:
        JsonlSource([good, empty])
    assert str(empty) in str(e.value)


def test_jsonl_source_missing_file(tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="not found") as e:
        JsonlSource([path])
    assert str(path) in str(e.value)


def test_jsonl_source_no_files():
    with pytest.raises(DataError, match="data.train"):
        JsonlSource([])


def test_jsonl_source_reads_by_index(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"prompt": "p0", "completion": "c0"}) + "\n\n" +
                 json.dumps({"prompt": "p1", "completion": "c1"}) + "\n")
    b.write_text(json.dumps({"prompt": "p2", "completion": "c2", "extra": 1}) + "\n")
    src = JsonlSource([a, b])
    assert len(src) == 3
    assert [src[i]["prompt"] for i in range(3)] == ["p0", "p1", "p2"]
    assert src[1]["_where"] == f"{a}:3" and src[2]["_where"] == f"{b}:1"
    assert src[2]["extra"] == 1
