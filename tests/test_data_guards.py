"""Data that would train the wrong tokens is refused or announced: unread fields, unknown roles,
completions cut before their end, a gzip file named `.jsonl`."""

from __future__ import annotations

import copy
import gzip
import json
import types

import numpy as np
import pytest

from conftest import DEMO_TRAIN, demo_texts
from make_tiny_model import CHAT_TEMPLATE, IM_END, train_tokenizer
from jaxsft.cli import main
from jaxsft.config import DataConfig, FieldsConfig, load_config
from jaxsft.data.pipeline import prepare_train
from jaxsft.data.render import (OVERLONG, PROMPT_TRUNCATED, TRUNCATED, Renderer, fit, known_roles, to_example,
                                trained_spans)
from jaxsft.data.sources import open_source
from jaxsft.errors import ConfigError, DataError

RECORDS = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:300]]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(demo_texts(400), vocab_size=512, chat_template=True)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("guards_tok")
    tok.save_pretrained(out)
    return out


def _lines(path, *records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def inspect_error(capsys, tmp_path, tok_dir, data: str, *overrides: str) -> str:
    """The one error line `jaxsft data inspect` prints for `data` (exit code 2, no traceback)."""
    (tmp_path / "empty.yaml").write_text("{}\n")
    capsys.readouterr()
    code = main(["data", "inspect", str(tmp_path / "empty.yaml"), f"model.path={tok_dir}", f"data.train={data}",
                 "-n", "0", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("jaxsft data: error: ")
    return line.removeprefix("jaxsft data: error: ")


def inspect_ok(capsys, tmp_path, tok_dir, data: str, *overrides: str) -> str:
    (tmp_path / "empty.yaml").write_text("{}\n")
    capsys.readouterr()
    code = main(["data", "inspect", str(tmp_path / "empty.yaml"), f"model.path={tok_dir}", f"data.train={data}",
                 "-n", "0", *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


# --- fields no mapping reads -------------------------------------------------------------------

ALPACA = [{"instruction": "Extract the order as JSON.", "input": "", "output": '{"item": "mug"}'},
          {"instruction": "Extract the order as JSON.", "input": "Ana Silva | 3 teal mugs",
           "output": '{"item": "mug"}'}]
ALPACA_MAP = ("data.fields.prompt=instruction", "data.fields.completion=output")


def test_unread_alpaca_input_is_an_error_naming_the_key(capsys, tmp_path, tok_dir):
    path = _lines(tmp_path / "alpaca.jsonl", *ALPACA)  # line 1's input is blank: nothing would be lost
    assert inspect_error(capsys, tmp_path, tok_dir, path, *ALPACA_MAP) == (
        f"{path}:2: record field 'input' is read by no data.fields mapping and would be left out of the example; "
        f"map it with data.fields.input=input (appended to the prompt after a blank line), or say it is meant "
        f"with data.ignore_fields=[input]")
    inspect_ok(capsys, tmp_path, tok_dir, path, *ALPACA_MAP, "data.fields.input=input")
    inspect_ok(capsys, tmp_path, tok_dir, path, *ALPACA_MAP, "data.ignore_fields=[input]")


def test_unread_fields_of_messages_and_unmapped_records(tok):
    sharegpt = {"id": "a1", "source": "web", "tags": [],  # an empty field loses nothing
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
                "_where": "chats.jsonl:7"}
    fields = FieldsConfig(messages="conversations", role="from", content="value")
    with pytest.raises(DataError) as e:
        Renderer(tok, DataConfig(fields=fields)).render(sharegpt)
    assert str(e.value) == (
        "chats.jsonl:7: record fields 'id', 'source' are read by no data.fields mapping and would be left out of "
        "the example; the messages schema reads 'conversations', 'tools'; map it with data.fields.*, or say it is "
        "meant with data.ignore_fields=[id,source]")
    Renderer(tok, DataConfig(fields=fields, ignore_fields=("id", "source"))).render(sharegpt)
    # Without a mapping, records in the default names may carry other fields (ids, metadata).
    Renderer(tok).render({"prompt": "p", "completion": "c", "id": 3, "_where": "d.jsonl:1"})
    assert load_config(None, ["data.ignore_fields=[id,source]"]).data.ignore_fields == ("id", "source")


# --- roles -------------------------------------------------------------------------------------

def test_unknown_roles_name_file_line_and_role(capsys, tmp_path, tok_dir, tok):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    typo = {"messages": [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "hello"}]}
    path = _lines(tmp_path / "chats.jsonl", good, typo)
    assert inspect_error(capsys, tmp_path, tok_dir, path) == (
        f"{path}:2: 'messages'[1] has the unknown role 'assitant' (did you mean 'assistant'?); "
        f"roles are system, user, assistant, tool")
    moderator = {"messages": [{"role": "moderator", "content": "be nice"}, *good["messages"]], "_where": "c.jsonl:4"}
    with pytest.raises(DataError, match=r"^c\.jsonl:4: 'messages'\[0\] has the unknown role 'moderator'; roles are "):
        Renderer(tok).render(moderator)
    listed = {"prompt": [{"role": "usr", "content": "hi"}], "completion": "hello", "_where": "p.jsonl:2"}
    with pytest.raises(DataError, match=r"^p\.jsonl:2: 'prompt'\[0\] has the unknown role 'usr' \(did you mean 'user'"):
        Renderer(tok).render(listed)


def test_roles_the_chat_template_handles_are_known(tok):
    llama3 = "{% for message in messages %}{% if message.role == 'ipython' or message['role'] != \"tool\" %}{% endif %}"
    assert known_roles(types.SimpleNamespace(chat_template=llama3)) == ("system", "user", "assistant", "tool",
                                                                       "ipython")
    assert known_roles(types.SimpleNamespace(chat_template=None)) == ("system", "user", "assistant", "tool")
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE.replace("{% for m in messages %}",
                                            "{% for m in messages %}{% if m['role'] == 'ipython' %}{% endif %}")
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "ipython", "content": "42"},
                           {"role": "assistant", "content": "hello"}]}
    ids, mask = Renderer(t).render(record)
    assert mask.sum() > 0


# --- truncation never trains a completion without its end ---------------------------------------

def test_fit_cuts_the_prompt_from_the_left_keeping_the_head():
    ids = np.arange(100, 130, dtype=np.int32)
    mask = np.zeros(30, np.int32)
    mask[20:] = 1  # a prompt of 20 ids, a completion of 10
    ex, status = to_example(ids, mask, seq_len=16, overlong="truncate_prompt", keep=2)
    assert status == PROMPT_TRUNCATED
    kept = np.r_[0:2, 15:30]  # 13 prompt ids cut after the first 2, the whole completion kept
    assert np.array_equal(ex["tokens"], ids[kept][:-1]) and np.array_equal(ex["targets"], ids[kept][1:])
    assert np.array_equal(ex["targets"][ex["loss_mask"] == 1], ids[20:])
    assert to_example(ids, mask, seq_len=16, overlong="truncate") == (None, OVERLONG)
    assert to_example(ids, mask, seq_len=9, overlong="truncate_prompt") == (None, OVERLONG)  # 10 trained > 9
    assert to_example(ids, mask, seq_len=10, overlong="truncate_prompt")[1] == PROMPT_TRUNCATED
    assert to_example(ids, mask, seq_len=10, overlong="truncate_prompt", keep=2) == (None, OVERLONG)


def test_fit_multi_turn_keeps_whole_turns_only():
    ids = np.arange(40, dtype=np.int32)
    mask = np.zeros(40, np.int32)
    mask[10:15] = 1  # turn 1
    mask[25:40] = 1  # turn 2, the last
    cut_ids, cut_mask, status = fit(ids, mask, 30, "truncate")  # turn 2 does not fit: cut after turn 1
    assert status == TRUNCATED and np.array_equal(cut_ids, ids[:15]) and np.array_equal(cut_mask, mask[:15])
    cut_ids, cut_mask, status = fit(ids, mask, 27, "truncate_prompt", keep=1)  # 12 ids cut: into turn 1
    assert status == PROMPT_TRUNCATED and len(cut_ids) == 28
    assert np.array_equal(cut_ids[cut_mask == 1], ids[25:40])  # turn 1's rest is not trained without its start
    tail = np.concatenate([mask, np.zeros(5, np.int32)])  # an untrained user turn after the last answer
    cut_ids, cut_mask, status = fit(np.arange(45, dtype=np.int32), tail, 40, "truncate_prompt")
    assert status == TRUNCATED and np.array_equal(cut_mask, mask)


def _end_of_turn(tok) -> list[int]:
    return tok(f"{IM_END}\n", add_special_tokens=False)["input_ids"]


def test_truncate_prompt_counts_and_whole_completions(tmp_path, tok):
    path = _lines(tmp_path / "d.jsonl", *RECORDS)
    renderer = Renderer(tok)
    rendered = [renderer.render(r) for r in RECORDS]
    trained = [int(mask[1:].sum()) for _, mask in rendered]
    seq_len = int(np.median(trained))  # every record is longer; about half the completions alone fit
    cfg = DataConfig(train=(path,), seq_len=seq_len, overlong="truncate_prompt", packing_bins=32)
    p = prepare_train(cfg, tok, seed=0)
    s = p.stats
    fits = sum(t <= seq_len for t in trained)
    assert 0 < fits < len(RECORDS) and all(len(ids) - 1 > seq_len for ids, _ in rendered)
    assert (s.kept, s.prompt_truncated, s.truncated, s.overlong) == (fits, fits, 0, len(RECORDS) - fits)
    assert s.summary(seq_len)[0] == (
        f"data: {len(RECORDS)} records | kept {fits} | dropped {len(RECORDS) - fits} too long, 0 with nothing to "
        f"train | truncated {fits} prompts to fit {seq_len} (data.overlong=truncate_prompt)")
    end = _end_of_turn(tok)
    (store,) = p.stores
    for i in range(len(store)):
        ex = store[i]
        ids, mask = rendered[int(store.where(i).rsplit(":", 1)[1]) - 1]
        assert len(ex["tokens"]) == seq_len and ex["tokens"][0] == tok.bos_token_id
        got = ex["targets"][ex["loss_mask"] == 1]
        assert np.array_equal(got, ids[mask == 1]) and got[-len(end):].tolist() == end  # the whole completion
    for overlong in ("truncate", "drop"):  # one completion a record: nothing can be kept
        s = prepare_train(DataConfig(train=(path,), seq_len=seq_len + 60, overlong=overlong), tok, seed=0).stats
        longer = sum(len(ids) - 1 > seq_len + 60 for ids, _ in rendered)
        assert (s.kept, s.overlong, s.truncated + s.prompt_truncated) == (len(RECORDS) - longer, longer, 0)


def test_truncate_prompt_keeps_the_system_message(tok):
    system = "You turn orders into JSON. Answer with one JSON object and nothing else."
    record = {"system": system, "prompt": RECORDS[0]["prompt"] * 3, "completion": RECORDS[0]["completion"],
              "_where": "d.jsonl:1"}
    renderer = Renderer(tok, DataConfig(seq_len=120, overlong="truncate_prompt"))
    ids, mask = renderer.render(record)
    head = renderer.head(record, ids)
    rendered_system = tok(f"{tok.bos_token}<|im_start|>system\n{system}{IM_END}\n", add_special_tokens=False)
    assert head == len(rendered_system["input_ids"]) > 1
    assert len(ids) - 1 > 120
    cut_ids, cut_mask, status = renderer.fit(record, ids, mask)
    assert status == PROMPT_TRUNCATED and len(cut_ids) == 121
    assert np.array_equal(cut_ids[:head], ids[:head]) and np.array_equal(cut_ids[cut_mask == 1], ids[mask == 1])


def test_overlong_values_and_default():
    assert DataConfig().overlong == "drop"
    assert load_config(None, ["data.overlong=truncate_prompt"]).data.overlong == "truncate_prompt"
    with pytest.raises(ConfigError, match="'data.overlong' is 'cut'; allowed: drop, truncate, truncate_prompt"):
        load_config(None, ["data.overlong=cut"])


def test_inspect_reports_truncated_prompts(capsys, tmp_path, tok_dir):
    path = _lines(tmp_path / "d.jsonl", *RECORDS[:50])
    out = inspect_ok(capsys, tmp_path, tok_dir, path, "data.seq_len=100", "data.overlong=truncate_prompt")
    assert "prompts to fit 100)" in out and "kept        50 (truncated " in out


# --- a compressed file named as JSON lines -------------------------------------------------------

def test_gzip_named_jsonl_names_its_right_name(capsys, tmp_path, tok_dir):
    path = tmp_path / "train.jsonl"
    path.write_bytes(gzip.compress(b'{"prompt": "p", "completion": "c"}\n'))
    assert inspect_error(capsys, tmp_path, tok_dir, str(path)) == (
        f"{path}: the file is gzip-compressed; name it train.jsonl.gz")
    (tmp_path / "train.jsonl.gz").write_bytes(path.read_bytes())
    assert open_source([str(tmp_path / "train.jsonl.gz")])[0]["completion"] == "c"
    parquet = tmp_path / "rows.json"
    parquet.write_bytes(b"PAR1\x00\x00")
    with pytest.raises(DataError, match=r"rows\.json: the file is Parquet; name it rows\.parquet"):
        open_source([str(parquet)])
