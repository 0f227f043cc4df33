"""`jaxsft data inspect`: statistics, packing efficiency (>= 97%: demo data, a long tail), examples, JSON."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEMO_TRAIN, ROOT
from make_tiny_model import read_jsonl_texts, train_tokenizer
from jaxsft.cli import main
from jaxsft.config import load_config
from jaxsft.data.inspect import ANSI_TRAINED, inspect_data
from jaxsft.data.render import Renderer

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory):
    """The tiny model's default tokenizer (make_tiny_model.py defaults: BPE merges digits). The demo itself now
    splits digits, which makes its examples ~118 tokens: 4 fill 472 of 512 positions (92% packing)."""
    out = tmp_path_factory.mktemp("demo_tok")
    train_tokenizer(read_jsonl_texts(str(DEMO_TRAIN)), vocab_size=1024, chat_template=True).save_pretrained(out)
    return out


def efficiency(text: str) -> float:
    return float(re.search(r"packing efficiency (\d+\.\d+)%", text).group(1)) / 100


def test_inspect_demo_data(demo_tokenizer_dir, capsys):
    assert main(["data", "inspect", str(DEMO_CONFIG), f"model.path={demo_tokenizer_dir}", "data.seq_len=512",
                 "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "records     2,000" in out and "kept        2,000 (none truncated)" in out
    assert re.search(r"dropped     0 too long .*, 0 with nothing to train", out)
    assert re.search(r"tokens      [\d,]+, [\d,]+ trained \(\d+\.\d%\)", out)
    assert efficiency(out) >= 0.97, out
    assert "lengths (tokens per example, before truncation):" in out and "median" in out
    # Piped, the trained tokens are in brackets: exactly the first record's completion and its end of turn.
    first = json.loads(DEMO_TRAIN.read_text().splitlines()[0])
    assert f"[[{first['completion']}<|im_end|>\n]]" in out
    assert out.count("--- ") == 2 and f"--- {DEMO_TRAIN.relative_to(ROOT)}:1: " in out


def test_inspect_long_tail(demo_tokenizer_dir, tmp_path, capsys):
    """Completions with log-normally distributed lengths (a long tail, some dropped at seq_len)."""
    rng = np.random.default_rng(0)
    words = "order mug lamp teal coral total date quantity name item color paid dollars for the of".split()
    path = tmp_path / "long_tail.jsonl"
    with path.open("w") as f:
        for n in np.clip(rng.lognormal(np.log(40), 1.0, size=3000).astype(int), 1, 2000):
            f.write(json.dumps({"prompt": "Write about orders.", "completion": " ".join(rng.choice(words, n))}) + "\n")
    assert main(["data", "inspect", str(DEMO_CONFIG), f"model.path={demo_tokenizer_dir}", f"data.train={path}",
                 "data.seq_len=512", "-n", "0"]) == 0
    out = capsys.readouterr().out
    dropped = int(re.search(r"dropped     ([\d,]+) too long", out).group(1).replace(",", ""))
    assert 0 < dropped < 100  # a tail reaching past seq_len, but a thin one
    assert efficiency(out) >= 0.97, out


def test_inspect_json_lines_in_dataset_order(demo_tokenizer_dir, capsys):
    assert main(["data", "inspect", str(DEMO_CONFIG), f"model.path={demo_tokenizer_dir}", "--json", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    cfg = load_config(DEMO_CONFIG, [f"model.path={demo_tokenizer_dir}"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    renderer = Renderer(tok, cfg.data)
    for line, raw in zip(lines, DEMO_TRAIN.read_text().splitlines()):
        x = json.loads(line)
        assert set(x) == {"tokens", "loss_mask", "text"}
        ids, mask = renderer.render(json.loads(raw))
        assert x["tokens"] == ids.tolist() and x["loss_mask"] == mask.tolist()
        assert x["text"] == tok.decode(ids.tolist(), skip_special_tokens=False)


def test_inspect_colours_on_a_terminal(demo_tokenizer_dir):
    cfg = load_config(DEMO_CONFIG, [f"model.path={demo_tokenizer_dir}"])
    out = io.StringIO()
    stats = inspect_data(cfg, examples=1, out=out, color=True)
    assert ANSI_TRAINED in out.getvalue() and "[[" not in out.getvalue()
    assert stats.records == 2000


def test_inspect_cli_errors_are_one_line(demo_tokenizer_dir, tmp_path):
    def run(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jaxsft.cli", "data", "inspect", str(DEMO_CONFIG), *overrides],
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT,
                              timeout=120)

    done = run("model.path=")
    assert done.returncode == 2 and "model.path" in done.stderr and "Traceback" not in done.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n')
    done = run(f"model.path={demo_tokenizer_dir}", f"data.train={bad}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"jaxsft data: error: {bad}:2: record has no 'completion' field (it has: prompt)"
