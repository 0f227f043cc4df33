"""The step spec: everything static that shapes the compiled train and eval steps, in one frozen object.

The data pipeline knows two bounds of the packed rows (the longest example, the most trained
targets of a row), the config gives the loss chunking, the non-finite policy and the attention
backend (resolved for the devices the step runs on). `make_train_step`, the eval step, `jaxsft
eval`, `jaxsft compile` and `train --dry-run` all take one `StepSpec`, so the program compiled
ahead of time is the program training runs, and `fingerprint` says so. `data_bounds` finds the
training data's bounds before a compile; `eval_spec` takes held-out batches' own.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from jaxsft import parallel
from jaxsft.data.pack import longest_segment, most_trained
from jaxsft.models.attention import resolve

ROW_TRAINED_MULTIPLE = 64  # the gathered positions per row, rounded up: fewer distinct shapes to compile


def row_trained_bound(max_trained: int, seq_len: int) -> int:
    """`row_trained` for rows of `seq_len` holding at most `max_trained` trained targets each: that
    rounded up to a multiple of 64, or 0 (read whole rows) where that is not fewer than `seq_len`."""
    bound = -(-max_trained // ROW_TRAINED_MULTIPLE) * ROW_TRAINED_MULTIPLE
    return bound if 0 < bound < seq_len else 0


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static shape of a train or eval step (hashable: it keys jit caches)."""

    attention: str | None = None  # the resolved backend (jaxsft.models.attention); None: auto for the default device
    max_segment_len: int = 0  # no packed example is longer (0: unknown): attention skips keys further back
    row_trained: int = 0  # no row holds more trained targets (0: unknown): the loss reads that many per row
    loss_chunk: int = 256
    loss_whole_mib: int = 64
    nonfinite: str = "stop"
    grad_accum: int = 1

    @classmethod
    def of(cls, cfg, platform: str, max_segment_len: int = 0, max_trained: int = 0, seq_len: int | None = None,
           ) -> "StepSpec":
        """The spec of a run of `cfg` on devices of `platform`, with the data's bounds (0: unknown)."""
        seq_len = seq_len or cfg.data.seq_len
        return cls(attention=resolve(cfg.model.attention, platform), max_segment_len=int(max_segment_len),
                   row_trained=row_trained_bound(int(max_trained), seq_len), loss_chunk=cfg.train.loss_chunk,
                   loss_whole_mib=cfg.train.loss_whole_mib, nonfinite=cfg.train.nonfinite,
                   grad_accum=cfg.train.grad_accum)

    def describe(self) -> str:
        longest = self.max_segment_len or "unknown (attention reads every earlier key)"
        trained = self.row_trained or "all positions"
        return (f"attention {self.attention}, longest example {longest}, loss positions per row {trained}, "
                f"grad_accum {self.grad_accum}")


def batch_bounds(batches: list[dict]) -> tuple[int, int]:
    """`(longest example, most trained targets of a row)` over these local batches (held-out
    rows), the same on every process."""
    longest = parallel.global_max(longest_segment([b["segment_ids"] for b in batches]))
    return longest, parallel.global_max(most_trained([b["loss_mask"] for b in batches]))


def eval_spec(cfg, mesh, batches: list[dict]) -> StepSpec:
    """The eval step's spec for these held-out (local) batches: their own bounds."""
    longest, max_trained = batch_bounds(batches)
    seq_len = batches[0]["loss_mask"].shape[-1] if batches else cfg.data.seq_len
    spec = StepSpec.of(cfg, mesh.devices.flat[0].platform, longest, max_trained, seq_len)
    return dataclasses.replace(spec, grad_accum=1)


def fingerprint(lowered) -> str:
    """A short hash of a lowered step's StableHLO text: equal programs, equal fingerprints."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]


def data_bounds(cfg, tokenizer=None) -> tuple[int, int, str]:
    """`(longest example, most trained targets of a row, how they were found)` of `cfg.data.train`
    when its files are at hand (the same numbers `jaxsft train` computes before its first step);
    `(0, 0, why not)` otherwise, which compiles the unbounded step."""
    from jaxsft.errors import JaxsftError

    import glob

    paths = list(cfg.data.train)
    if not paths or not all(Path(p).exists() or glob.glob(p) for p in paths):
        return 0, 0, f"assumed: no bounds (data.train {list(paths)} is not at hand)"
    try:
        from jaxsft.data.pipeline import train_batches
        from jaxsft.data.render import load_tokenizer

        tokenizer = tokenizer or load_tokenizer(cfg.model.path)
        batches = train_batches(cfg.data, tokenizer, seed=cfg.train.seed, global_batch=cfg.train.batch_size,
                                shards=cfg.data.shards or 1, process_index=0, process_count=1)
    except (JaxsftError, OSError) as e:
        return 0, 0, f"assumed: no bounds (data.train could not be read: {str(e).splitlines()[0][:160]})"
    return batches.longest, batches.most_trained, "from data.train"


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled step as XLA's `memory_analysis()` gives them (arguments,
    outputs, the outputs aliased onto donated arguments, temporaries, generated code), and their
    `total`: what the step needs on each device while it runs."""
    m = compiled.memory_analysis()
    mem = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
           "temp": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes}
    mem["total"] = mem["argument"] + mem["temp"] + mem["output"] - mem["alias"] + mem["code"]
    return mem


def step_line(spec: StepSpec, lowered, compiled, compile_s: float) -> str:
    """One line for a compiled train step: its spec, its program's fingerprint and what XLA's
    `memory_analysis()` says it needs per device (printed by `train`, `--dry-run` and `compile`)."""
    mem = compiled_memory(compiled)
    return (f"step: {spec.describe()} | program {fingerprint(lowered)} | compiled in {compile_s:.1f} s: "
            f"{mem['total'] / 2**30:,.3f} GiB per device (arguments {mem['argument'] / 2**30:,.3f} GiB, "
            f"temporaries {mem['temp'] / 2**30:,.3f} GiB)")
