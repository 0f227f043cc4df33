#!/usr/bin/env python3
"""Export time and peak host memory of `jaxsft export` on a >1 GB checkpoint, against Hugging Face's re-save.

Builds (once; reused from the cache directory) the random float32 Llama of `tools/bench_load.py`
(4 layers, width 2048, vocab 32000: 1.25 GB), with a tokenizer from `tools/make_tiny_model.py`
and its few -0.0 weights made +0.0 (see `positive_zeros`). Then makes a real run directory with
`jaxsft train` for one step at learning rate 0, so the checkpoint (params plus both Adam moments,
written by Orbax) holds the source weights' exact bits.
Then, each in a fresh process, times and measures:

  jaxsft export RUN_DIR OUT --dtype float32 / bfloat16      (`jaxsft.cli.main`, as the console script runs it)
  AutoModelForCausalLM.from_pretrained(hf_dir, dtype=...).save_pretrained(OUT)   (the peer: what a
      user of transformers would run to re-save a model)

Each process first imports what it needs, then resets its peak-RSS counter (`/proc/self/clear_refs`)
and notes its resident memory, so "growth" is the peak resident memory of the export itself above
the imported code, to compare with the largest single tensor and the checkpoint's size. Each export
runs `--repeat` times, interleaved with the others; the table keeps the fastest time and the
largest growth. Every
exported tensor is then compared bit for bit with the source safetensors (float32: the same bits;
bfloat16: the same bits as torch's round-to-nearest-even cast), one tensor at a time. Prints a
Markdown table for the README, with the machine it ran on.

    .venv/bin/python tools/bench_export.py [--cache runs/bench_export] [--layers 4] [--repeat 3] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_load import CONFIG, tensor_shapes, write_checkpoint  # noqa: E402
from make_tiny_model import read_jsonl_texts, train_tokenizer  # noqa: E402

DATA = ROOT / "configs" / "demo_data" / "train.jsonl"
GB = 1e9

# One measured export, in a fresh process: imports, then the export alone is timed and its peak RSS taken.
CHILD = r"""
import json, sys, time
tool, source, out, dtype, result = sys.argv[1:]
t0 = time.perf_counter()
if tool == "jaxsft":
    import jaxsft.cli, jaxsft.export
else:  # the peer: load and re-save with transformers, the usual way
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM restarts from the current RSS: the peak of what follows
baseline, t1 = status("VmRSS"), time.perf_counter()  # the export, timed from here
if tool == "jaxsft":
    rc = jaxsft.cli.main(["export", source, out, "--dtype", dtype])
    if rc:
        sys.exit(rc)
else:
    AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).save_pretrained(out)
json.dump({"imports_s": t1 - t0, "export_s": time.perf_counter() - t1, "baseline": baseline,
           "peak": status("VmHWM")}, open(result, "w"))
"""


def build_source(out: Path, layers: int) -> Path:
    """The Hugging Face directory: bench_load's random Llama plus a tokenizer trained on the demo data."""
    cfg = dict(CONFIG, num_hidden_layers=layers, bos_token_id=0, eos_token_id=3, pad_token_id=4)
    if (out / "bench_export.json").is_file() and (out / "tokenizer.json").is_file() \
            and json.loads((out / "config.json").read_text()) == cfg:
        print(f"source model: {out} (cached)")
        return out
    t0 = time.perf_counter()
    (out / "bench_export.json").unlink(missing_ok=True)
    write_checkpoint(out, cfg)
    zeros = positive_zeros(out / "model.safetensors")
    tokenizer = train_tokenizer(read_jsonl_texts(str(DATA)), vocab_size=1024)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 3, 4)
    tokenizer.save_pretrained(str(out))
    (out / "bench_export.json").write_text(json.dumps({"negative_zeros_made_positive": zeros}) + "\n")
    print(f"source model: {out} (written in {time.perf_counter() - t0:.1f} s; {zeros} -0.0 made +0.0)")
    return out


def positive_zeros(weights: Path) -> int:
    """Rewrites each -0.0 of a float32 safetensors file as +0.0, in place; returns how many there were.

    The learning-rate-0 training step adds an update of +-0.0 to every parameter: the identity,
    except that -0.0 + +0.0 is +0.0 in IEEE arithmetic. Without negative zeros in the source the
    checkpoint holds the source's exact bits, so the export can be checked bit for bit against it.
    """
    with open(weights, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    bits = np.memmap(weights, dtype=np.uint32, mode="r+", offset=8 + header)  # every tensor is F32
    count = 0
    for start in range(0, bits.size, 1 << 24):
        chunk = bits[start:start + (1 << 24)]
        negative = chunk == 0x80000000
        count += int(negative.sum())
        chunk[negative] = 0
    bits.flush()
    del bits
    return count


def build_run(run_dir: Path, source: Path) -> Path:
    """A run directory from `jaxsft train`: one step at learning rate 0, checkpointed at that step."""
    stamp = run_dir / "bench_source.json"
    weights = (source / "model.safetensors").stat()
    key = json.dumps({"source": str(source), "config": json.loads((source / "config.json").read_text()),
                      "weights": [weights.st_size, weights.st_mtime_ns]})
    if (run_dir / "checkpoints" / "1").is_dir() and stamp.is_file() and stamp.read_text() == key:
        print(f"run dir: {run_dir} (cached)")
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "jaxsft.cli", "train", str(ROOT / "configs" / "demo.yaml"), f"model.path={source}",
           f"data.train=[{DATA}]", "data.eval=[]", "data.seq_len=256", "train.batch_size=1", "train.steps=1",
           "mesh.fsdp=1", "optimizer.lr=0.0", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
           "checkpoint.every=1", f"run.dir={run_dir}", "run.export="]
    r = measure(cmd, run_dir.parent / "train.log")
    print(f"run dir: {run_dir} (jaxsft train, 1 step at lr 0: {r['seconds']:.0f} s, peak RSS {r['peak'] / GB:.2f} GB)")
    stamp.write_text(key)
    return run_dir


def measure(cmd: list[str], log: Path) -> dict:
    """Runs `cmd` to completion; its wall time, peak RSS (ru_maxrss) and bytes read/written (rchar/wchar)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    io = {}
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:  # cumulative counters: the last read before exit is within one poll of the total
                io = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
            except OSError:
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return {"seconds": seconds, "peak": usage.ru_maxrss * 1024,
            "read": int(io.get("rchar", 0)), "written": int(io.get("wchar", 0))}


def dir_size(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for one file or index-listed shards."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: hf_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(hf_dir / "model.safetensors", framework="pt") as f:
        return {k: hf_dir / "model.safetensors" for k in f.keys()}


def same_bits(source: Path, out_dir: Path, dtype: str) -> tuple[int, list[str]]:
    """Compares every tensor of `out_dir` with the source's (cast to `dtype` the way torch rounds),
    one tensor in memory at a time; returns (tensors compared, mismatches)."""
    import torch
    from safetensors import safe_open

    want_dtype = getattr(torch, dtype)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[want_dtype]
    src, out = weight_files(source), weight_files(out_dir)
    bad = [f"names differ: missing {sorted(set(src) - set(out))}, extra {sorted(set(out) - set(src))}"] \
        if set(src) != set(out) else []
    for name in sorted(set(src) & set(out)):
        with safe_open(src[name], framework="pt") as a, safe_open(out[name], framework="pt") as b:
            want, got = a.get_tensor(name).to(want_dtype), b.get_tensor(name)
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got.view(bits), want.view(bits)):
                bad.append(f"{name}: {got.dtype} {list(got.shape)} differs from {want.dtype} {list(want.shape)}")
    return len(src), bad


def machine() -> str:
    """CPU model, cores this process may use, and RAM, from /proc."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    ram = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {ram / 2**30:.0f} GiB RAM"


def main() -> None:
    """Builds or reuses the model and run, measures each export in a fresh process, checks the bits, prints."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench_export"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--skip-hf", action="store_true", help="measure jaxsft export only")
    p.add_argument("--repeat", type=int, default=3, help="runs of each export (default 3)")
    a = p.parse_args()
    t_start = time.perf_counter()
    load_start = Path("/proc/loadavg").read_text().split()[0]
    cache = Path(a.cache).absolute()
    cache.mkdir(parents=True, exist_ok=True)
    source = build_source(cache / f"llama-{a.layers}l-{CONFIG['hidden_size']}", a.layers)
    run_dir = build_run(cache / "run", source)

    shapes = tensor_shapes(dict(CONFIG, num_hidden_layers=a.layers))
    largest_name, largest_shape = max(shapes.items(), key=lambda kv: math.prod(kv[1]))
    largest = math.prod(largest_shape) * 4
    model_bytes = (source / "model.safetensors").stat().st_size
    ckpt_bytes = dir_size(run_dir / "checkpoints" / "1")
    assert model_bytes >= 1e9, model_bytes

    jobs = []  # (tool, dtype, label, source)
    for dtype in ("float32", "bfloat16"):
        jobs.append(("jaxsft", dtype, f"`jaxsft export --dtype {dtype}`", run_dir))
        if not a.skip_hf:
            jobs.append(("hf", dtype, f"HF `from_pretrained(dtype={dtype}).save_pretrained`", source))
    runs: dict[tuple, list[dict]] = {}
    for rep in range(a.repeat):  # interleaved, so a busy spell on a shared machine spreads over all of them
        for tool, dtype, label, src in jobs:
            out, result = cache / f"out-{tool}-{dtype}", cache / f"{tool}-{dtype}.json"
            shutil.rmtree(out, ignore_errors=True)
            r = measure([sys.executable, "-c", CHILD, tool, str(src), str(out), dtype, str(result)],
                        cache / f"{tool}-{dtype}.log") | json.loads(result.read_text())
            runs.setdefault((tool, dtype), []).append(r)
            print(f"  [{rep + 1}/{a.repeat}] {label}: {r['seconds']:.1f} s ({r['imports_s']:.1f} s imports, "
                  f"{r['export_s']:.1f} s export); RSS after imports {r['baseline'] / GB:.2f} GB, peak "
                  f"{r['peak'] / GB:.2f} GB; read() {r['read'] / GB:.2f} GB (mmap not counted), "
                  f"write() {r['written'] / GB:.2f} GB")

    rows = []
    for tool, dtype, label, _ in jobs:
        out = cache / f"out-{tool}-{dtype}"
        n, bad = same_bits(source, out, dtype)
        check = f"all {n} identical" if not bad else f"{len(bad)} of {n} differ"
        print(f"  {label}: tensors vs the source as {dtype}, bit for bit: {check}")
        for line in bad[:5]:
            print(f"    {line}")
        rs = runs[(tool, dtype)]
        rows.append((label, min(rs, key=lambda r: r["export_s"]), max(r["peak"] - r["baseline"] for r in rs),
                     dir_size(out), check))

    print(f"\nLlama, {a.layers} layers, width {CONFIG['hidden_size']}, vocab {CONFIG['vocab_size']}: "
          f"{model_bytes / GB:.2f} GB of float32 safetensors; largest tensor {largest_name} {list(largest_shape)} "
          f"= {largest / GB:.3f} GB; the jaxsft checkpoint (params + 2 Adam moments, Orbax) is "
          f"{ckpt_bytes / GB:.2f} GB on disk. Times: the fastest of {a.repeat} runs; growth: the largest.")
    load_end = Path("/proc/loadavg").read_text().split()[0]
    print(f"Machine: {machine()}; 1-minute load average {load_start} at the start, {load_end} at the end.\n")
    print("| export | wall s | imports s | export s | RSS after imports GB | peak RSS GB | growth GB | "
          "growth / largest tensor | output GB | tensors vs source |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, r, growth, size, check in rows:
        print(f"| {label} | {r['seconds']:.1f} | {r['imports_s']:.1f} | {r['export_s']:.1f} | "
              f"{r['baseline'] / GB:.2f} | {(r['baseline'] + growth) / GB:.2f} | {growth / GB:.2f} | "
              f"{growth / largest:.1f}x | {size / GB:.2f} | {check} |")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
