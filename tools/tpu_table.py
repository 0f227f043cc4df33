"""The README's TPU table: every config in `configs/` compiled for its TPU slice from this CPU host,
with MaxText's `train_compile` of the same model, batch and slice beside it, one after the other
in one run (never two compiles at once: they share this machine's cores).

    .venv/bin/python tools/tpu_table.py [--maxtext-venv /tmp/mt-venv] [--only llama3.1-8b]

jaxsft: `jaxsft compile CONFIG --topology SLICE` (its `step:` line: memory per chip, compile time).
MaxText (when `--maxtext-venv` names a venv with `maxtext[tpu]==0.2.5`, see
`../shared/peers/maxtext.md`): its `train_compile` module, with `jax.stages.Lowered.compile`
timed, and its printed `memory_analysis()`. Per-chip HBM is arguments + temporaries + outputs -
aliased + code, as `jaxsft compile` counts it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, config, overrides, slice, MaxText arguments for the same model, batch and slice or None)
ROWS = [
    ("llama3.1-8b", "configs/llama3.1-8b-v5p-8.yaml", ["data.seq_len=2048"], "v5p-8",
     ["model_name=llama3-8b", "per_device_batch_size=1", "max_target_length=2048"]),
    ("llama3.1-8b", "configs/llama3.1-8b-v5p-8.yaml", [], "v5p-8",
     ["model_name=llama3.1-8b", "per_device_batch_size=1", "max_target_length=8192"]),
    ("qwen2.5-7b", "configs/qwen2.5-7b-v6e-8.yaml", [], "v6e-8",
     ["model_name=qwen2.5-7b", "per_device_batch_size=1", "max_target_length=4096"]),
    ("gemma2-9b", "configs/gemma2-9b-v5e-16.yaml", [], "v5e-16",
     ["model_name=gemma2-9b", "per_device_batch_size=1", "max_target_length=2048", "ici_tensor_parallelism=2",
      "allow_split_physical_axes=true"]),
    ("llama3.1-70b", "configs/llama3.1-70b-v5p-64.yaml", [], "v5p-64",
     ["model_name=llama3.1-70b", "per_device_batch_size=1", "max_target_length=4096"]),
]

# Runs MaxText's train_compile with the compile call timed (MaxText prints memory_analysis itself).
MAXTEXT_SHIM = """
import runpy, sys, time, jax
compile_ = jax.stages.Lowered.compile
def timed(self, *a, **k):
    t = time.perf_counter()
    out = compile_(self, *a, **k)
    print(f"MAXTEXT_COMPILE_SECONDS {time.perf_counter() - t:.1f}", flush=True)
    return out
jax.stages.Lowered.compile = timed
sys.argv = ["train_compile"] + sys.argv[1:]
runpy.run_module("maxtext.trainers.pre_train.train_compile", run_name="__main__")
"""

GIB = 2**30


def run(cmd: list[str], cwd: Path) -> tuple[str, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return p.stdout + p.stderr, time.perf_counter() - t


def jaxsft_row(config: str, overrides: list[str], topology: str) -> str:
    out, wall = run([str(ROOT / ".venv/bin/jaxsft"), "compile", config, "--topology", topology, *overrides], ROOT)
    m = re.search(r"compiled in ([\d.]+) s: ([\d.,]+) GiB per device \(arguments ([\d.,]+) GiB, "
                  r"temporaries ([\d.,]+) GiB\)", out)
    if not m:
        tail = [line for line in out.splitlines() if line.strip()][-3:]
        return f"failed: {' / '.join(tail)[:300]}"
    comp, total, args, temps = m.groups()
    attn = re.search(r"step: attention (\w+)", out).group(1)
    return f"{total} GiB (arguments {args}, temporaries {temps}); compile {comp} s ({wall:.0f} s in all); {attn}"


def maxtext_row(venv: Path, mt_args: list[str], topology: str) -> str:
    cfg = next(venv.glob("lib/python3*/site-packages/maxtext/configs/base.yml"))
    out, wall = run([str(venv / "bin/python"), "-c", MAXTEXT_SHIM, str(cfg), "run_name=aot",
                     "base_output_directory=/tmp/mt-out", f"compile_topology={topology}",
                     "compile_topology_num_slices=1", *mt_args], Path("/tmp"))
    m = re.search(r"CompiledMemoryStats\(generated_code_size_in_bytes=(\d+), argument_size_in_bytes=(\d+), "
                  r"output_size_in_bytes=(\d+), alias_size_in_bytes=(\d+), temp_size_in_bytes=(\d+)", out)
    secs = re.findall(r"MAXTEXT_COMPILE_SECONDS ([\d.]+)", out)
    if not m:
        oom = re.search(r"(RESOURCE_EXHAUSTED[^\n]{0,200}|CompileTimeHbmOom[^\n]{0,200})", out)
        tail = [line for line in out.splitlines() if line.strip()][-2:]
        return f"failed: {(oom.group(1) if oom else ' / '.join(tail))[:300]}"
    code, arg, out_, alias, temp = map(int, m.groups())
    total = (arg + temp + out_ - alias + code) / GIB
    return (f"{total:.3f} GiB (arguments {arg / GIB:.3f}, temporaries {temp / GIB:.3f}); "
            f"compile {secs[-1] if secs else '?'} s ({wall:.0f} s in all)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maxtext-venv", type=Path, default=None)
    p.add_argument("--only", default=None, help="rows whose label contains this")
    a = p.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores; per chip, as the TPU compiler reports it")
    print("| config | slice | jaxsft | MaxText 0.2.5 |")
    print("| --- | --- | --- | --- |")
    for label, config, overrides, topology, mt_args in ROWS:
        if a.only and a.only not in label:
            continue
        ours = jaxsft_row(config, overrides, topology)
        theirs = maxtext_row(a.maxtext_venv, mt_args, topology) if a.maxtext_venv and mt_args else "not run"
        name = f"`{Path(config).name}` {' '.join(f'`{o}`' for o in overrides)}".strip()
        print(f"| {name} | {topology} | {ours} | {theirs} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
