"""Sources: JSONL (plain, gzip), Parquet, Hugging Face save_to_disk, globs, mixtures, field mapping, errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from conftest import DEMO_TRAIN, demo_texts
from make_tiny_model import train_tokenizer
from jaxsft.config import DataConfig, FieldsConfig, load_config
from jaxsft.data.pack import BATCH_KEYS
from jaxsft.data.pipeline import batches, prepare_train, record_sources
from jaxsft.data.render import Renderer
from jaxsft.data.sources import JsonlSource, open_source
from jaxsft.errors import ConfigError, DataError

RECORDS = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:60]]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(demo_texts(400), vocab_size=512, chat_template=True)


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _examples(cfg: DataConfig, tok) -> list[tuple[list[int], list[int]]]:
    """Every kept example, in record order: (ids, mask)."""
    p = prepare_train(cfg, tok, seed=0)
    return [tuple(x.tolist() for x in store.ids_and_mask(i)) for store in p.stores for i in range(len(store))]


# --- formats -----------------------------------------------------------------------------------

def test_formats_give_the_same_examples(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "d.jsonl").read_bytes()))
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet", row_group_size=16)
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "hf"))
    expected = _examples(DataConfig(train=(plain,)), tok)
    assert len(expected) == len(RECORDS)
    for spec in (str(gz), str(tmp_path / "d.parquet"), str(tmp_path / "hf")):
        assert _examples(DataConfig(train=(spec,)), tok) == expected, spec
    src = open_source([str(tmp_path / "d.parquet"), str(tmp_path / "hf"), str(gz)])
    assert len(src) == 3 * len(RECORDS)
    assert src[5]["_where"] == f"{tmp_path / 'd.parquet'} row 5"
    assert src[len(RECORDS) + 7]["_where"] == f"{tmp_path / 'hf'} row 7"
    assert src[2 * len(RECORDS)]["_where"] == f"{gz}:1"


def test_globs_and_several_files(tmp_path, tok):
    for k in range(3):
        _write_jsonl(tmp_path / f"part-{k}.jsonl", RECORDS[20 * k:20 * (k + 1)])
    expected = _examples(DataConfig(train=(_write_jsonl(tmp_path / "all.json", RECORDS),)), tok)
    assert _examples(DataConfig(train=(str(tmp_path / "part-*.jsonl"),)), tok) == expected
    listed = tuple(str(tmp_path / f"part-{k}.jsonl") for k in range(3))
    assert _examples(DataConfig(train=listed), tok) == expected


def test_hf_dataset_dict_names_its_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits train; name one split's directory, e\.g\. .*dd/train"):
        open_source([str(tmp_path / "dd")])
    assert len(open_source([str(tmp_path / "dd" / "train")])) == len(RECORDS)


# --- errors name the file and the line (or row) ------------------------------------------------

GOOD = json.dumps({"prompt": "p", "completion": "c"})


@pytest.mark.parametrize("bad_line, expected", [
    ('{"prompt": "p", "completion": ', "not valid JSON"),
    (json.dumps({"prompt": "p"}), "no 'completion' field"),
    (json.dumps({"prompt": 3, "completion": "c"}), "'prompt' must be"),
    (json.dumps({"prompt": "p", "completion": "  "}), "no trained tokens"),
    (json.dumps(["p", "c"]), "JSON object"),
], ids=["malformed", "no-completion", "non-string-prompt", "empty-completion", "not-an-object"])
def test_bad_jsonl_record_names_file_and_line(tmp_path, tok, bad_line, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")  # blank line 2: numbering counts it
    with pytest.raises(DataError) as e:
        prepare_train(DataConfig(train=(str(path),)), tok, seed=0)
    assert str(e.value).startswith(f"{path}:3: ") and expected in str(e.value)


def test_bad_parquet_row_names_file_and_row(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = RECORDS[:5] + [{"prompt": "p", "completion": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.parquet'} row 5: 'completion' must be"):
        prepare_train(DataConfig(train=(str(tmp_path / "d.parquet"),)), tok, seed=0)


@pytest.mark.parametrize("content, expected", [("\n  \n", "no records"), (None, "not found")])
def test_empty_or_missing_file(tmp_path, content, expected):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=expected) as e:
        open_source([str(path)])
    assert str(path) in str(e.value)


def test_no_files_glob_without_match_unknown_format(tmp_path):
    with pytest.raises(DataError, match="data.train"):
        open_source([])
    with pytest.raises(DataError, match=r"config key 'data.eval': '.*nothing-\*\.jsonl' matches no files"):
        open_source([str(tmp_path / "nothing-*.jsonl")], "data.eval")
    (tmp_path / "d.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown data format"):
        open_source([str(tmp_path / "d.csv")])


def test_jsonl_reads_by_index(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"prompt": "p0", "completion": "c0"}) + "\n\n" +
                    json.dumps({"prompt": "p1", "completion": "c1", "extra": 1}) + "\n")
    src = JsonlSource(path)
    assert len(src) == 2 and [src[i]["prompt"] for i in range(2)] == ["p0", "p1"]
    assert src[1]["_where"] == f"{path}:3" and src[1]["extra"] == 1


# --- field mapping -----------------------------------------------------------------------------

def test_field_mapping_alpaca_question_answer_sharegpt(tmp_path, tok):
    r = RECORDS[0]
    instruction, _, rest = r["prompt"].partition("\n")
    reference = Renderer(tok).render({"prompt": f"{instruction}\n\n{rest}", "completion": r["completion"]})
    alpaca = {"instruction": instruction, "input": rest, "output": r["completion"]}
    fields = FieldsConfig(prompt="instruction", input="input", completion="output")
    got = Renderer(tok, DataConfig(fields=fields)).render(alpaca)
    assert all(np.array_equal(a, b) for a, b in zip(got, reference))

    reference = Renderer(tok).render(r)
    qa = Renderer(tok, DataConfig(fields=FieldsConfig(prompt="question", completion="answer")))
    assert all(np.array_equal(a, b) for a, b in zip(qa.render({"question": r["prompt"], "answer": r["completion"]}),
                                                      reference))
    sharegpt = {"conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["completion"]}]}
    fields = FieldsConfig(messages="conversations", role="from", content="value")
    got = Renderer(tok, DataConfig(fields=fields)).render(sharegpt)
    assert all(np.array_equal(a, b) for a, b in zip(got, reference))


def test_field_mapping_from_yaml_overrides():
    cfg = load_config(None, ["data.fields.prompt=instruction", "data.fields.completion=output",
                             "data.schema=prompt_completion"])
    assert cfg.data.fields == FieldsConfig(prompt="instruction", completion="output")
    assert cfg.data.schema == "prompt_completion"
    with pytest.raises(ConfigError, match="data.fields.nope"):
        load_config(None, ["data.fields.nope=x"])
    with pytest.raises(ConfigError, match="data.empty"):
        load_config(None, ["data.empty=skip"])


# --- mixtures ----------------------------------------------------------------------------------

def test_weighted_mixture_proportions_and_shards(tmp_path, tok):
    a = _write_jsonl(tmp_path / "a.jsonl", RECORDS[:40])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": f"Plain text number {i} for the mixture."} for i in range(20)])
    cfg = DataConfig(train=(a, b), weights=(3.0, 1.0), seq_len=256, packing_bins=8)
    assert len(record_sources(cfg)) == 2
    p = prepare_train(cfg, tok, seed=0)
    from_b = {tuple(p.stores[1][i]["tokens"].tolist()) for i in range(len(p.stores[1]))}
    counts = np.zeros(2)
    it = iter(batches(p, cfg, seed=0, local_batch=4))
    for _ in range(60):
        batch = next(it)
        for r in range(4):
            seg = batch["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                counts[int(tuple(batch["tokens"][r][seg == s].tolist()) in from_b)] += 1
    # 3:1 in expectation; the smaller source repeats more often (the mixture is by example, not by epoch)
    assert 0.68 < counts[0] / counts.sum() < 0.82, counts
    # each process takes its share of each source
    shares = [prepare_train(cfg, tok, seed=0, shard=i, shards=2) for i in (0, 1)]
    assert [len(s) for s in shares[0].stores] == [20, 10] and [len(s) for s in shares[1].stores] == [20, 10]
    assert not {shares[0].stores[0].where(i) for i in range(20)} & {shares[1].stores[0].where(i) for i in range(20)}
    assert set(BATCH_KEYS) == set(batch)


@pytest.mark.parametrize("override, message", [
    (["data.train=[a.jsonl,b.jsonl]", "data.weights=[1.0]"], "1 weights for 2 'data.train' entries"),
    (["data.train=[a.jsonl,b.jsonl]", "data.weights=[1.0,0]"], "must all be positive"),
])
def test_weights_validation_names_the_key(override, message):
    with pytest.raises(ConfigError, match=rf"'data.weights'.*{message}|{message}"):
        load_config(None, override)
