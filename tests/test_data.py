"""Data: records -> rendered, loss-masked examples -> packed rows -> deterministic, resumable, sharded batches."""

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
from jaxsft.data.pack import (BATCH_KEYS, longest_segment, most_trained, pack_list, packing_bound, packing_efficiency,  # noqa: E402
                              plan_rows)
from jaxsft.data.pipeline import batches, eval_batches, prepare_train, train_batches  # noqa: E402
from jaxsft.data.render import EMPTY, KEPT, OVERLONG, TRUNCATED, Renderer, to_example  # noqa: E402
from jaxsft.errors import ConfigError, DataError  # noqa: E402

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
    P, C = RECORD["prompt"], RECORD["completion"]
    user = [{"role": "user", "content": P}]
    prompt_text = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt_text == f"<|begin_of_text|><|im_start|>user\n{P}<|im_end|>\n<|im_start|>assistant\n"
    # Trained: the completion and what the template closes the turn with: <|im_end|> and its newline.
    assert tok.decode(ids[mask == 1]) == C + IM_END + "\n"
    trained_at = np.flatnonzero(mask)
    assert np.array_equal(trained_at, np.arange(trained_at[0], len(ids)))  # one run, to the end
    assert ids[trained_at[-2]] == tok.eos_token_id  # the end-of-turn token is trained
    # Untrained: exactly the prompt as rendered alone with the generation prompt.
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert ids[mask == 0].tolist() == prompt_ids == ids[:len(prompt_ids)].tolist()
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": C}], tokenize=False)
    assert tok.decode(ids) == full


def test_render_without_chat_template(base_tok):
    tok = base_tok
    ids, mask = Renderer(tok).render(RECORD)
    P, C = RECORD["prompt"], RECORD["completion"]
    assert tok.decode(ids[mask == 1]) == C + END_OF_TEXT
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1
    prompt = ids[mask == 0]
    assert prompt[0] == tok.bos_token_id and tok.decode(prompt[1:]) == P
    n0 = int((mask == 0).sum())
    assert not mask[:n0].any() and mask[n0:].all()  # 0...0 1...1


def test_render_every_demo_record(chat_tok):
    renderer = Renderer(chat_tok)
    for r in _records(50):
        ids, mask = renderer.render(r)
        assert chat_tok.decode(ids[mask == 1]) == r["completion"] + IM_END + "\n"


def test_render_text_trains_every_token(base_tok):
    ids, mask = Renderer(base_tok).render({"text": "Plain language modelling."})
    assert ids[0] == base_tok.bos_token_id and ids[-1] == base_tok.eos_token_id and mask.all()
    assert base_tok.decode(ids[1:-1]) == "Plain language modelling."


def test_train_on_prompt(chat_tok):
    _, mask = Renderer(chat_tok, DataConfig(train_on_prompt=True)).render(RECORD)
    assert mask.all()


def test_renderer_requires_eos():
    class NoEos:
        chat_template = None
        eos_token_id = None

    with pytest.raises(DataError, match="eos"):
        Renderer(NoEos())


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "p"}, "no 'completion' field"),
    ({"prompt": 3, "completion": "c"}, "'prompt' must be a string or a list"),
    ({"question": "q", "answer": "a"}, "none of the fields"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"content": "hi"}]}, "has no string 'role'"),
    ({"messages": [{"role": "user", "content": "q"}], "tools": "{not json"}, "'tools' is a string but not JSON"),
], ids=["no-completion", "non-string-prompt", "unknown-fields", "messages-not-list", "no-role", "bad-tools"])
def test_bad_record_names_where(chat_tok, record, expected):
    with pytest.raises(DataError) as e:
        Renderer(chat_tok).render(record | {"_where": "data.jsonl:3"})
    assert str(e.value).startswith("data.jsonl:3: ") and expected in str(e.value)


def test_messages_need_a_chat_template(base_tok):
    with pytest.raises(DataError, match="no chat template"):
        Renderer(base_tok).render({"messages": [{"role": "user", "content": "q"}], "_where": "f:1"})


# --- to_example: shift and length policy -------------------------------------------------------

def test_to_example_shifts():
    ids = np.arange(10, 20, dtype=np.int32)
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0], np.int32)
    ex, status = to_example(ids, mask, seq_len=64, overlong="truncate")
    assert status == KEPT and set(ex) == {"tokens", "targets", "loss_mask"}
    assert np.array_equal(ex["tokens"], ids[:-1]) and np.array_equal(ex["targets"], ids[1:])
    assert np.array_equal(ex["loss_mask"], mask[1:])
    ex, status = to_example(ids, mask, seq_len=9, overlong="drop")  # seq_len + 1 ids fit
    assert status == KEPT and len(ex["tokens"]) == 9


def test_to_example_overlong_truncate_vs_drop():
    ids = np.arange(100, 130, dtype=np.int32)
    mask = np.zeros(30, np.int32)
    mask[5:] = 1  # a completion of 25 ids: cut, it would be trained without its end
    assert to_example(ids, mask, seq_len=16, overlong="truncate") == (None, OVERLONG)
    assert to_example(ids, mask, seq_len=16, overlong="drop") == (None, OVERLONG)
    text = np.ones(30, np.int32)  # every token trained (text): cut at seq_len
    ex, status = to_example(ids, text, seq_len=16, overlong="truncate")
    assert status == TRUNCATED
    assert np.array_equal(ex["tokens"], ids[:16]) and np.array_equal(ex["targets"], ids[1:17])


def test_to_example_nothing_trained():
    ids = np.arange(30, dtype=np.int32)
    mask = np.zeros(30, np.int32)
    mask[20:] = 1  # every trained target lies beyond seq_len
    assert to_example(ids, mask, seq_len=16, overlong="truncate") == (None, OVERLONG)
    first_only = np.zeros(30, np.int32)
    first_only[0] = 1  # the first id is never a target
    assert to_example(ids, first_only, seq_len=64, overlong="truncate") == (None, EMPTY)


# --- packing -----------------------------------------------------------------------------------

def _synthetic_examples(n: int = 30, seq_len: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(1, seq_len + 1, size=n - 2)) + [seq_len, 1]  # include the extremes
    examples = []
    for i, n_tokens in enumerate(lengths):
        ids = rng.integers(5, 1000, size=int(n_tokens) + 1).astype(np.int32)
        ids[0] = 1000 + i  # unique first token: every example is distinct
        mask = (rng.random(n_tokens + 1) < 0.6).astype(np.int32)
        mask[-1] = 1
        ex, _ = to_example(ids, mask, seq_len, "truncate")
        assert len(ex["tokens"]) == n_tokens
        examples.append(ex)
    return examples


def _segments(row: dict) -> list[dict]:
    out = []
    for seg in np.unique(row["segment_ids"]):
        if seg:
            at = row["segment_ids"] == seg
            out.append({k: row[k][at] for k in ("tokens", "targets", "loss_mask", "positions")} |
                       {"where": np.flatnonzero(at)})
    return out


def test_pack_list_contract():
    seq_len = 64
    examples = _synthetic_examples(30, seq_len)
    rows = pack_list(examples, seq_len)
    assert sum(len(e["tokens"]) for e in examples) <= len(rows) * seq_len and len(rows) < len(examples)
    originals = {tuple(e["tokens"]): e for e in examples}
    seen = collections.Counter()
    for row in rows:
        assert set(row) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert row[k].shape == (seq_len,) and row[k].dtype == np.int32, k
        seg = row["segment_ids"]
        nonpad = int((seg != 0).sum())
        # segment ids: 1, 2, ... in order, contiguous, with 0 only as a padding tail
        assert (seg[:nonpad] != 0).all() and (seg[nonpad:] == 0).all()
        assert (np.diff(seg[:nonpad]) >= 0).all() and set(seg[:nonpad]) == set(range(1, seg.max() + 1))
        for k in ("tokens", "targets", "loss_mask", "positions"):
            assert not row[k][nonpad:].any(), k  # padding holds and trains nothing
        for s in _segments(row):
            assert np.array_equal(s["where"], np.arange(s["where"][0], s["where"][-1] + 1))
            assert np.array_equal(s["positions"], np.arange(len(s["tokens"])))
            orig = originals[tuple(s["tokens"])]
            # no target crosses into the next segment: each carries its own targets and mask
            assert np.array_equal(s["targets"], orig["targets"]) and np.array_equal(s["loss_mask"], orig["loss_mask"])
            seen[tuple(s["tokens"])] += 1
    assert seen == collections.Counter(originals.keys())  # every example exactly once


def test_pack_list_keeps_segment_boundaries():
    a, _ = to_example(np.array([7, 8, 9], np.int32), np.array([0, 1, 1], np.int32), 16, "truncate")
    b, _ = to_example(np.array([20, 21, 22, 23], np.int32), np.array([0, 0, 1, 1], np.int32), 16, "truncate")
    (row,) = pack_list([a, b], 16)
    assert list(row["segment_ids"][:5]) == [1, 1, 2, 2, 2]
    assert list(row["tokens"][:5]) == [7, 8, 20, 21, 22]
    assert list(row["targets"][:5]) == [8, 9, 21, 22, 23]  # not 8, 20, ...
    assert list(row["loss_mask"][:5]) == [1, 1, 0, 1, 1]
    assert list(row["positions"][:5]) == [0, 1, 0, 1, 2]


def test_plan_rows_fills_rows_exactly_when_it_can():
    # 6 x 5 + 6 x 3 tokens into rows of 8: the best plan pairs one 5 with one 3 in every row.
    lengths = [5, 5, 3, 5, 3, 3, 5, 5, 3, 3, 5, 3]
    rows = plan_rows(lengths, 8)
    assert len(rows) == 6 and all(sum(lengths[i] for i in row) == 8 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    # Grain's best-fit (one example at a time into the tightest open row) would pair 5s poorly here;
    # the plan never needs more rows than the tokens require plus one.
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(1, 200, size=500))
    rows = plan_rows(lengths, 256)
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert len(rows) <= int(np.ceil(sum(lengths) / 256)) + 1


def test_packing_efficiency_long_tail():
    # Log-normal lengths (many short examples, a long tail clipped at seq_len): >= 97% non-padding.
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(150), 1.0, size=5000).astype(int) + 1, 1, 1024)
    efficiency, rows = packing_efficiency(lengths, 1024, 256)
    assert efficiency >= 0.97 and rows * 1024 * efficiency == pytest.approx(lengths.sum())


# --- the training pipeline ---------------------------------------------------------------------

SEQ_LEN, LOCAL_BATCH = 256, 4


def _cfg(**kw) -> DataConfig:
    return DataConfig(**({"train": (str(DEMO_TRAIN),), "seq_len": SEQ_LEN, "packing_bins": 32} | kw))


@pytest.fixture(scope="module")
def prepared(chat_tok):
    return prepare_train(_cfg(), chat_tok, seed=0)


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)


def _rows(batch: dict) -> list[dict]:
    return [dict(zip(BATCH_KEYS, vals)) for vals in zip(*(batch[k] for k in BATCH_KEYS))]


def test_prepared_counts(prepared):
    s = prepared.stats
    assert s.records == s.kept == 2000 and s.truncated == s.overlong == s.empty == 0
    assert s.tokens == sum(len(st) and int(st.lengths().sum()) for st in prepared.stores)
    assert 0.3 < s.trained / s.tokens < 0.6
    # ~130-token examples in rows of 256: mostly one a row; the efficiency says exactly that.
    assert s.efficiency == pytest.approx(s.tokens / (s.rows * SEQ_LEN)) and 0.6 < s.efficiency < 0.8


def test_train_batches(chat_tok, prepared):
    it = iter(batches(prepared, _cfg(), seed=0, local_batch=LOCAL_BATCH))
    completions = {r["completion"] for r in _records()}
    for batch in _take(it, 3):
        assert set(batch) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert batch[k].shape == (LOCAL_BATCH, SEQ_LEN) and batch[k].dtype == np.int32, k
        assert not batch["loss_mask"][batch["segment_ids"] == 0].any()
        for row in _rows(batch):
            for s in _segments(row):
                assert np.array_equal(s["positions"], np.arange(len(s["tokens"])))
                # each packed example trains exactly one demo completion and its end of turn
                trained = chat_tok.decode(s["targets"][s["loss_mask"] == 1])
                assert trained.endswith(IM_END + "\n") and trained[: -len(IM_END) - 1] in completions
                assert s["tokens"][0] == chat_tok.bos_token_id


def test_longest_segment():
    assert longest_segment(np.array([[1, 1, 1, 2, 2, 0, 0, 0, 0]])) == 3  # padding is not an example
    assert longest_segment(np.array([[1, 2, 2, 2, 2], [1, 1, 1, 0, 0]])) == 4
    assert longest_segment(np.zeros((2, 5), np.int32)) == 0
    assert longest_segment(np.array([[1, 1, 2, 1]])) == 4  # not contiguous: no bound below the row


def test_train_batches_know_their_longest_example(chat_tok, prepared):
    """`longest` (what attention may skip beyond) is the longest prepared example and bounds every row."""
    it = train_batches(_cfg(), chat_tok, seed=0, global_batch=LOCAL_BATCH, shards=1, report=False)
    assert it.longest == max(int(st.lengths().max()) for st in prepared.stores)
    seen = [longest_segment(b["segment_ids"]) for b in _take(it, 20)]
    assert max(seen) <= it.longest and max(seen) > 0.9 * it.longest


def test_train_batches_bound_the_trained_targets_of_a_row(chat_tok, prepared):
    """`most_trained` (how many positions per row the loss reads) is the largest trained share of
    any prepared example times seq_len: no row holds more, and the demo's rows come close to it."""
    store = prepared.stores[0]
    ids, mask = store.ids_and_mask(3)
    assert store.trained()[3] == mask[1:].sum() == store[3]["loss_mask"].sum()
    it = train_batches(_cfg(), chat_tok, seed=0, global_batch=LOCAL_BATCH, shards=1, report=False)
    share = max(float((st.trained() / st.lengths()).max()) for st in prepared.stores)
    assert it.most_trained == int(share * SEQ_LEN) < SEQ_LEN
    seen = [most_trained(b["loss_mask"]) for b in _take(it, 20)]
    assert max(seen) <= it.most_trained and max(seen) > 0.8 * it.most_trained
    assert most_trained(np.array([[0, 1, 1, 0], [1, 1, 1, 0]])) == 3
    assert most_trained([np.zeros((2, 4)), np.ones((1, 4))]) == 4 and most_trained([]) == 0


def test_train_dataset_deterministic(chat_tok, prepared):
    cfg = _cfg()
    a = _take(iter(batches(prepared, cfg, seed=0, local_batch=LOCAL_BATCH)), 3)
    b = _take(iter(batches(prepare_train(cfg, chat_tok, seed=0), cfg, seed=0, local_batch=LOCAL_BATCH)), 3)
    c = _take(iter(batches(prepared, cfg, seed=1, local_batch=LOCAL_BATCH)), 3)
    assert _same(a, b) and not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def _first_window_end(prepared, cfg) -> int:
    """How many batches it takes to finish the packer's first window (its state then names the next)."""
    it = iter(batches(prepared, cfg, seed=0, local_batch=LOCAL_BATCH))
    for k in range(1, 1000):
        next(it)
        if it.get_state()["window"] == 1:
            return k - 1
    raise AssertionError("no second window")


@pytest.mark.parametrize("where", ["mid-window", "window-boundary", "second-epoch"])
def test_exact_resume_mid_epoch(chat_tok, prepared, where):
    """Stop mid-epoch, restore from the saved state: the next 5 packed batches are bit-identical."""
    cfg = _cfg()
    epoch_batches = prepared.stats.rows // LOCAL_BATCH
    stop_after = {"mid-window": 3, "window-boundary": _first_window_end(prepared, cfg),
                  "second-epoch": epoch_batches + 10}[where]
    it = iter(batches(prepared, cfg, seed=0, local_batch=LOCAL_BATCH))
    _take(it, stop_after)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint holds: JSON
    expected = _take(it, 5)
    fresh = iter(batches(prepare_train(cfg, chat_tok, seed=0), cfg, seed=0, local_batch=LOCAL_BATCH))
    fresh.set_state(state)
    assert _same(_take(fresh, 5), expected)
    first = _take(iter(batches(prepared, cfg, seed=0, local_batch=LOCAL_BATCH)), 5)
    assert not _same(first, expected)  # the resumed batches are not simply the first ones again


def test_exact_resume_through_orbax_checkpoint(tmp_path, chat_tok):
    """The same through the run's Checkpointer, with the run's iterator over 2 data shards: the
    per-shard states saved with the train state, restored into a fresh iterator."""
    import jax.numpy as jnp

    from jaxsft.checkpoint import Checkpointer

    cfg = _cfg()
    it = train_batches(cfg, chat_tok, seed=0, global_batch=2 * LOCAL_BATCH, shards=2, report=False)
    _take(it, 11)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(11, {"step": jnp.asarray(11)}, it)
    ckpt.wait()
    expected = _take(it, 5)
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt" / "11" / "data").glob("shard_*")) == [
        "shard_0-of-2.json", "shard_1-of-2.json"]
    fresh = train_batches(cfg, chat_tok, seed=0, global_batch=2 * LOCAL_BATCH, shards=2, report=False)
    reader = Checkpointer(tmp_path / "ckpt")
    assert reader.data_shards(11) == 2
    _, fresh = reader.restore(11, {"step": jnp.asarray(0)}, fresh)
    reader.close()
    assert _same(_take(fresh, 5), expected)


def test_global_batch_is_the_same_on_any_process_count(chat_tok):
    """With the same data.shards, the rows processes supply, put together in process order, are
    the global batch one process makes; each process builds only the shards its rows come from."""
    cfg = _cfg()
    one = _take(train_batches(cfg, chat_tok, seed=0, global_batch=8, shards=2, report=False), 3)
    for processes in (2, 4, 8):
        parts = [train_batches(cfg, chat_tok, seed=0, global_batch=8, shards=2, process_index=p,
                               process_count=processes, report=False) for p in range(processes)]
        assert [len(p.iterators) for p in parts] == [1] * processes
        got = [{k: np.concatenate([b[k] for b in step]) for k in step[0]} for step in zip(*(_take(p, 3) for p in parts))]
        assert _same(got, one), processes
    with pytest.raises(ConfigError, match="data.shards"):
        train_batches(cfg, chat_tok, seed=0, global_batch=8, shards=3, report=False)


def _tokens_of(prepared) -> set[tuple]:
    return {tuple(store[i]["tokens"].tolist()) for store in prepared.stores for i in range(len(store))}


def test_two_process_shards_are_disjoint_and_cover(chat_tok):
    cfg = _cfg()
    shards = [prepare_train(cfg, chat_tok, seed=0, shard=i, shards=2) for i in (0, 1)]
    wheres = [[s.where(i) for s in p.stores for i in range(len(s))] for p in shards]
    all_lines = [f"{DEMO_TRAIN}:{n}" for n in range(1, 2001)]
    assert len(wheres[0]) == len(wheres[1]) == 1000
    assert not set(wheres[0]) & set(wheres[1]) and sorted(wheres[0] + wheres[1]) == sorted(all_lines)
    assert wheres[0][:3] == all_lines[0:6:2] and wheres[1][:3] == all_lines[1:6:2]  # every other record
    # Each process's batches hold only its own share, and all of it within two epochs' worth of rows
    # (the packing window that spans the epoch boundary holds the end of the first epoch).
    tokens = [_tokens_of(p) for p in shards]
    assert len(tokens[0]) == len(tokens[1]) == 1000 and not tokens[0] & tokens[1]
    for p, own in zip(shards, tokens):
        seen = set()
        for batch in _take(iter(batches(p, cfg, seed=0, local_batch=LOCAL_BATCH)), 2 * p.stats.rows // LOCAL_BATCH):
            seen |= {tuple(s["tokens"].tolist()) for row in _rows(batch) for s in _segments(row)}
        assert seen == own


def test_shuffled_epochs_cover_every_record(chat_tok, tmp_path):
    path = tmp_path / "small.jsonl"
    records = _records(10)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    # One example per row, one row per window; prompts cut so the longer records fit too.
    cfg = _cfg(train=(str(path),), packing_bins=1, seq_len=128, overlong="truncate_prompt")
    p = prepare_train(cfg, chat_tok, seed=0)
    by_tokens = {tuple(p.stores[0][i]["tokens"].tolist()): i for i in range(10)}

    def order(prepared, seed, n):
        rows = [row for b in _take(iter(batches(prepared, cfg, seed=seed, local_batch=1)), n) for row in _rows(b)]
        return [by_tokens[tuple(s["tokens"].tolist())] for row in rows for s in _segments(row)]

    seen = order(p, 0, 30)
    epochs = [seen[i:i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != list(range(10)) and len({tuple(e) for e in epochs}) > 1  # shuffled, reshuffled
    assert order(p, 1, 10) != epochs[0] and order(p, 0, 30) == seen  # follows the seed


def test_eval_batches_in_order_padded(chat_tok, tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(9)))
    out = eval_batches(_cfg(eval=(str(path),)), chat_tok, local_batch=4)
    segments = [s for b in out for row in _rows(b) for s in _segments(row)]
    assert len(segments) == 9 and all(b["tokens"].shape == (4, SEQ_LEN) for b in out)
    assert not out[-1]["segment_ids"][-1].any()  # padded with empty rows


def test_empty_examples_error_or_drop(chat_tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({"prompt": "p", "completion": " "}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: the example has no trained tokens.*data.empty=drop"):
        prepare_train(_cfg(train=(str(path),)), chat_tok, seed=0)
    s = prepare_train(_cfg(train=(str(path),), empty="drop"), chat_tok, seed=0).stats
    assert (s.records, s.kept, s.empty) == (2, 1, 1)


def test_overlong_counts(chat_tok):
    lengths = [len(Renderer(chat_tok).render(r)[0]) - 1 for r in _records()]
    cut = int(np.median(lengths))
    longer = sum(n > cut for n in lengths)
    for overlong in ("drop", "truncate"):  # one completion a record: cut, it would lose its end
        s = prepare_train(_cfg(seq_len=cut, overlong=overlong), chat_tok, seed=0).stats
        assert s.overlong == longer and s.kept == 2000 - longer and s.truncated == 0
        assert s.tokens == sum(n for n in lengths if n <= cut)
    assert max(s.lengths) > cut  # the histogram sees the untruncated lengths


def test_nothing_left_to_train_is_an_error(chat_tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORD) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl.*no example left to train on in data shard 0 of 1 \(1 dropped"):
        prepare_train(_cfg(train=(str(path),), seq_len=8, overlong="drop"), chat_tok, seed=0)
    with pytest.raises(DataError, match="no example left to train on in data shard 1 of 2"):
        prepare_train(_cfg(train=(str(path),)), chat_tok, seed=0, shard=1, shards=2)


def test_packing_bound_and_a_plan_that_reaches_it():
    """The bound `data inspect` prints: examples of 103-134 tokens (the demo with a digit-splitting
    tokenizer) fit 4 to a row of 512, never 5, so 92% is the most any packing reaches, and the
    planner comes within a row of it; with 60-110 tokens the tokens themselves are the limit."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(103, 135, size=2000).tolist()
    bound, why = packing_bound(lengths, 512)
    assert why == "no 5 examples fit in 512" and bound == sum(lengths) / (500 * 512)
    efficiency, rows = packing_efficiency(lengths, 512, 256)
    assert rows <= 501 and efficiency >= bound - 0.002  # windows of 256 rows are planned one by one
    short = rng.integers(60, 111, size=2000).tolist()
    bound, why = packing_bound(short, 512)
    assert why == "the tokens alone" and bound > 0.99
    assert packing_efficiency(short, 512, 256)[0] >= 0.97
    assert packing_bound([300, 300, 300, 10, 10], 512) == (920 / 1536, "examples longer than half a row")
