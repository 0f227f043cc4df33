"""`jaxsft import-gguf` refusals, through the CLI in-process: a cut-short file and architectures
jaxsft cannot train each give exit code 2 and one message naming the problem, no traceback, and
leave neither OUT_DIR nor a partial directory behind. (A successful import is tests/test_real_weights.py's.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxsft import cli
from test_real_weights import smollm2_paths

gguf = pytest.importorskip("gguf")


def refused(capsys, source: Path, out: Path) -> str:
    """The one error line of `jaxsft import-gguf SOURCE OUT`, after checking it left nothing."""
    assert cli.main(["import-gguf", str(source), str(out)]) == 2
    err = capsys.readouterr().err  # transformers may log a warning of its own before
    lines = [x for x in err.splitlines() if x.startswith("jaxsft import-gguf: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    return lines[0]


@pytest.mark.parametrize("keep", ["header", "half"])
def test_truncated_file_is_refused(tmp_path, capsys, keep):
    _, real = smollm2_paths()
    size = real.stat().st_size
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(4096 if keep == "header" else size // 2))
    message = refused(capsys, cut, tmp_path / "out")
    assert str(cut) in message and "cut short" in message


def tiny_gguf(path: Path, architecture: str) -> Path:
    """A GGUF file of `architecture` with one small tensor and a block count."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture, reason", [
    ("mamba", "is not one jaxsft can train"),  # transformers reads it; no jaxsft family
    ("rwkv6", "transformers' GGUF loader does not read it"),
])
def test_unsupported_architecture_is_refused(tmp_path, capsys, architecture, reason):
    source = tiny_gguf(tmp_path / f"{architecture}.gguf", architecture)
    message = refused(capsys, source, tmp_path / "out")
    assert f"GGUF architecture '{architecture}'" in message and reason in message


def test_non_empty_output_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["import-gguf", str(tiny_gguf(tmp_path / "m.gguf", "mamba")), str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
