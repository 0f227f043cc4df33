"""The step spec: everything static that shapes the compiled train and eval steps, in one frozen object.

The data pipeline knows two bounds of the packed rows (the longest example, the most trained
targets of a row), the config gives the loss chunking, the non-finite policy and the attention
backend (resolved for the devices the step runs on). `make_train_step`, the eval step, `jaxsft
eval`, `jaxsft compile` and `train --dry-run` all take one `StepSpec`, so the program compiled
ahead of time is the program training runs, and `fingerprint` says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from jaxsft.loss import row_trained_bound
from jaxsft.models.attention import resolve


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
    def of(cls, cfg, platform: str, max_segment_len: int = 0, most_trained: int = 0, seq_len: int | None = None,
           ) -> "StepSpec":
        """The spec of a run of `cfg` on devices of `platform`, with the data's bounds (0: unknown)."""
        seq_len = seq_len or cfg.data.seq_len
        return cls(attention=resolve(cfg.model.attention, platform), max_segment_len=int(max_segment_len),
                   row_trained=row_trained_bound(int(most_trained), seq_len), loss_chunk=cfg.train.loss_chunk,
                   loss_whole_mib=cfg.train.loss_whole_mib, nonfinite=cfg.train.nonfinite,
                   grad_accum=cfg.train.grad_accum)

    def describe(self) -> str:
        longest = self.max_segment_len or "unknown (attention reads every earlier key)"
        trained = self.row_trained or "all positions"
        return (f"attention {self.attention}, longest example {longest}, loss positions per row {trained}, "
                f"grad_accum {self.grad_accum}")


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


def step_line(spec: StepSpec, lowered, compiled, compile_s: float) -> str:
    """One line for a compiled train step: its spec, its program's fingerprint and what XLA's
    `memory_analysis()` says it needs per device (printed by `train`, `--dry-run` and `compile`)."""
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.generated_code_size_in_bytes)
    return (f"step: {spec.describe()} | program {fingerprint(lowered)} | compiled in {compile_s:.1f} s: "
            f"{total / 2**30:,.3f} GiB per device (arguments {m.argument_size_in_bytes / 2**30:,.3f} GiB, "
            f"temporaries {m.temp_size_in_bytes / 2**30:,.3f} GiB)")
