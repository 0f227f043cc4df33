"""Orbax checkpoints: train state (params, optimizer state, step) and the data iterator, together.

One checkpoint per saved step under `RUN_DIR/checkpoints/<step>/`, with two items:
  state  the train-state pytree, sharded arrays written by every process
  data   the Grain iterator state (one small JSON file per process)
Orbax writes each step into a temporary directory and renames it when complete, so a crash during
a save never leaves a checkpoint that `latest_step` would pick up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
from absl import logging as absl_logging
import jax
import orbax.checkpoint as ocp

from jaxsft.config import CheckpointConfig


def abstract_like(tree: Any) -> Any:
    """`ShapeDtypeStruct`s (with shardings) describing a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restore_args(abstract: Any) -> Any:
    return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
    """Saves and restores `(state, data_iterator)` pairs in a run directory."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig | None = None, *, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.directory = Path(directory).absolute()
        verbosity = absl_logging.get_verbosity()
        if read_only:  # Orbax warns that a read-only manager will not save: that is the point here
            absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=not read_only, read_only=read_only,
                                                   enable_async_checkpointing=True)
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logging.set_verbosity(verbosity)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Starts saving (asynchronously for the arrays); `wait` blocks until it is on disk."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

    def restore(self, step: int, state_like: Any, data_iterator: Any) -> tuple[Any, Any]:
        """Restores the state onto the shardings of `state_like` (arrays or ShapeDtypeStructs) and
        sets `data_iterator` to where it was."""
        abstract = abstract_like(state_like)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract)),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state, restored.data

    def restore_params(self, step: int, params_like: Any) -> Any:
        """Restores only `state["params"]` (for export): optimizer state is never read."""
        abstract = {"params": params_like}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract), partial_restore=True)))
        return restored.state["params"]

    def wait(self) -> None:
        """Blocks until every started save is complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
