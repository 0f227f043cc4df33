"""Orbax checkpoints: the train state, the data iterator and the config, saved together.

One checkpoint per saved step under `RUN_DIR/checkpoints/<step>/`, with three items:
  state   the train-state pytree (params, optimizer state, step): sharded arrays written by every
          process; arrays stacked over layers are stored one layer per chunk, so export can read
          one layer's tensor without the others
  data    the data iterator's state: one small JSON file per data shard (`shard_<s>-of-<S>.json`,
          written by the process that supplies the shard's first row), so a run resumes on any
          number of processes (see `data/pipeline.py`)
  config  the resolved run config (JSON)
The run holds no random state besides the data order, which the iterator state carries.

Saves are asynchronous: `save` returns once the arrays are copied off the devices, and training
goes on while a background thread writes them. Orbax writes each step into a temporary directory
(`<step>.orbax-checkpoint-tmp...`) renamed to `<step>` once every item is complete, so a crash during a
save never leaves a checkpoint that `latest_step` would pick up; the next start removes the leftovers.

Restoring reshards as it reads: each array is read straight onto the shardings of the target state,
whatever the mesh that saved it (8 devices `fsdp=8` -> 1 or 2 devices, or the reverse).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging as absl_logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from jaxsft.config import CheckpointConfig
from jaxsft.errors import Interrupted, JaxsftError, check_free_space, disk_full, is_disk_full

STATE, DATA, CONFIG = "state", "data", "config"


class DataStateHandler(ocp.CheckpointHandler):
    """Orbax handler for `data.pipeline.ShardedBatches`: one JSON state per data shard."""

    def save(self, directory: epath.Path, args: "DataSave") -> None:
        it = args.item
        state = it.get_state()
        for s in it.owned:
            (directory / f"shard_{s}-of-{it.shards}.json").write_text(json.dumps(state[str(s)]))

    def restore(self, directory: epath.Path, args: "DataRestore") -> Any:
        it = args.item
        state = {}
        for s in it.iterators:
            path = directory / f"shard_{s}-of-{it.shards}.json"
            if not path.exists():
                raise ValueError(f"{path} does not exist: the checkpoint's data was split into other shards "
                                 f"than data.shards={it.shards}")
            state[str(s)] = json.loads(path.read_text())
        it.set_state(state)
        return it

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


def abstract_like(tree: Any) -> Any:
    """`ShapeDtypeStruct`s (with shardings) describing a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restore_args(abstract: Any) -> Any:
    return ocp.checkpoint_utils.construct_restore_args(abstract)


def _save_args(state: Any) -> Any:
    """One storage chunk per layer for arrays stacked over layers (a `layers` key in their path)."""
    def one(path, x):
        stacked = x.ndim > 0 and any(getattr(k, "key", None) == "layers" for k in path)
        return ocp.SaveArgs(shard_axes=(0,) if stacked else ())
    return jax.tree_util.tree_map_with_path(one, state)


def _policy(cfg: CheckpointConfig):
    """Which checkpoints survive: the newest `keep`, and with `keep_best` the lowest eval_loss too."""
    if not cfg.keep_best:
        return LatestN(cfg.keep)
    # BestN keeps the last n after sorting; descending order puts the lowest loss last.
    best = BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False)
    return AnyPreservationPolicy([LatestN(cfg.keep), best])


class _QuietOrbaxThreads(logging.Filter):
    """Drops the tracebacks Orbax logs from each of its threads when a save fails (dozens for one
    full disk): `Checkpointer.check` raises the failure once, in the main thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname
                    and (record.exc_info or "No space left on device" in record.getMessage()))


def local_bytes(state: Any) -> int:
    """Bytes this process writes for `state`: its shards of each array, one copy of a replicated one."""
    return sum(math.prod(s.data.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)
               if isinstance(x, jax.Array) for s in x.addressable_shards if s.replica_id == 0)


class Checkpointer:
    """Saves and restores `(state, data_iterator, config)` in a run's checkpoint directory."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig | None = None, *, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.directory = Path(directory).absolute()
        self._closed = False
        self._in_flight: int | None = None  # the step of a save started and not yet seen complete
        self._failed_step: int | None = None
        self._quiet = _QuietOrbaxThreads()
        if not read_only:
            logging.getLogger("absl").addFilter(self._quiet)
        verbosity = absl_logging.get_verbosity()
        if read_only:  # Orbax warns that a read-only manager will not save: that is the point here
            absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=None if read_only else _policy(cfg), create=not read_only,
                read_only=read_only, enable_async_checkpointing=True,
                # Temporary directories of saves a crash interrupted: never complete, never needed.
                cleanup_tmp_directories=not read_only)
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logging.set_verbosity(verbosity)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def step_dir(self, step: int) -> Path:
        """The directory of the checkpoint of `step`."""
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_iterator: Any = None, config: dict | None = None,
             metrics: dict | None = None) -> bool:
        """Starts saving a checkpoint of `step` (the arrays are written in the background; `wait`
        blocks until it is on disk). `metrics` (`{"eval_loss": ...}`) rank it for `checkpoint.keep_best`.
        Returns False, saving nothing, when `step` is already saved."""
        self.check(wait=True)  # an earlier save that failed stops the run here, before another starts
        if step in self.manager.all_steps():  # e.g. preempted right after a regular save
            return False
        check_free_space(self.step_dir(step), local_bytes(state), "checkpoint", self._after())
        items = {STATE: ocp.args.PyTreeSave(state, save_args=_save_args(state))}
        if data_iterator is not None:
            items[DATA] = DataSave(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config)
        self._in_flight = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - the synchronous part of the save failed
            self._fail(e)

    def check(self, wait: bool = False) -> None:
        """Raises `JaxsftError` (`DiskFullError` for a full disk) if the save in flight failed:
        checked without blocking while it is still writing, unless `wait`. Its temporary directory
        is removed first; the checkpoints completed before it are untouched."""
        if self._in_flight is None or (not wait and self.manager.is_saving_in_progress()):
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - raised from Orbax's threads
            self._fail(e)
        self._in_flight = None

    def _after(self) -> str:
        latest = self.latest_step()
        kept = (f"the newest complete checkpoint, {self.step_dir(latest)}, is kept" if latest is not None
                else "no checkpoint was completed yet")
        return f"; the run stopped: {kept}. Free some space and run the same command to resume"

    def _fail(self, e: Exception) -> None:
        step, self._in_flight, self._failed_step = self._in_flight, None, self._in_flight
        with contextlib.suppress(Exception):  # the save's other threads
            self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full(self.step_dir(step), "checkpoint", after=self._after()) from None
        first = (str(e).splitlines() or [""])[0][:300]
        raise JaxsftError(f"checkpoint {self.step_dir(step)}: saving failed ({type(e).__name__}: {first})"
                          f"{self._after()}") from e

    def restore(self, step: int, state_like: Any, data_iterator: Any) -> tuple[Any, Any]:
        """Restores the state onto the shardings of `state_like` (arrays or ShapeDtypeStructs, on any
        mesh) and sets `data_iterator` to where it was."""
        abstract = abstract_like(state_like)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract)),
            DATA: DataRestore(data_iterator)}))
        return restored[STATE], restored[DATA]

    def restore_params(self, step: int, params_like: Any) -> Any:
        """Restores only `state["params"]`: the optimizer state is never read."""
        abstract = {"params": params_like}
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract), partial_restore=True)}))
        return restored[STATE]["params"]

    def data_shards(self, step: int) -> int | None:
        """The number of data shards whose iterator states the checkpoint of `step` holds."""
        names = sorted(p.name for p in (self.step_dir(step) / DATA).glob("shard_*-of-*.json"))
        return int(names[0].rsplit("-of-", 1)[1].removesuffix(".json")) if names else None

    def read_config(self, step: int) -> dict | None:
        """The run config saved with the checkpoint of `step` (None if it has none)."""
        if not (self.step_dir(step) / CONFIG).is_dir():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def wait(self) -> None:
        """Blocks until every started save is complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the saves in flight, then releases the manager (and its threads: an open one
        at interpreter exit prints a traceback). Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._failed_step is None:
                self.check(wait=True)  # the last save, failing here, stops the run like any other
        finally:
            self._close_manager()
            logging.getLogger("absl").removeFilter(self._quiet)

    def _close_manager(self) -> None:
        # The manager starts removing old temporary directories in a thread; `close` does not wait
        # for it, and when it outlives the interpreter it prints a traceback (an error early in a run).
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        if self._failed_step is None:
            self.manager.close()
            return
        # After a failed save `wait_until_finished` raises its error again: close the rest as `close` does.
        for name in ("_checkpointer", "_non_blocking_metadata_store", "_blocking_metadata_store",
                     "_checkpoint_deleter"):
            with contextlib.suppress(Exception):
                getattr(self.manager, name).close()


class SavedArrays:
    """The arrays of one checkpoint's train state, read slice by slice with TensorStore.

    Nothing goes through a device and only the requested slice is ever in memory: reading layer
    `i` of a layer-stacked array reads just that layer's chunk. `tree` mirrors the saved state with
    Orbax `ArrayMetadata` leaves (`shape`, `dtype`).
    """

    def __init__(self, step_dir: str | Path):
        state_dir = epath.Path(Path(step_dir).absolute() / STATE)
        metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir)
        self.tree = metadata.tree
        self._zarr3 = bool(metadata.use_zarr3)
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(state_dir)
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
        self._open: dict[str, ts.TensorStore] = {}

    def read(self, leaf: Any, index: tuple = ()) -> np.ndarray:
        """`index` (integers and slices, as in numpy) of the saved array that `leaf` describes."""
        if leaf.name not in self._open:
            info = ocp.type_handlers.ParamInfo(name=leaf.name, parent_dir=epath.Path(leaf.directory),
                                               is_ocdbt_checkpoint=self._ocdbt, use_zarr3=self._zarr3,
                                               ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            self._open[leaf.name] = ts.open(spec, context=self._context, open=True, read=True).result()
        return np.asarray(self._open[leaf.name][index].read().result())


class Preemption:
    """SIGTERM (the usual preemption notice) and SIGINT (Ctrl-C) during a run, as a context manager
    around all of it (the previous handlers are put back on exit).

    While `armed` (around the loop) the first signal becomes "save at the next step boundary and
    stop", which `reached` reports; a second raises `Interrupted` at once. Unarmed (loading, data
    preparation, compiling, the step-0 evaluation, and after the loop) a signal raises `Interrupted`
    at once, saying `idle`. With several processes, JAX's preemption service (which catches SIGTERM
    itself) agrees on one step for every process, so they all save the same step; SIGINT then
    raises `Interrupted` at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer: Checkpointer | None = None,
                 idle: str = "before the first step: nothing was trained or saved"):
        self.checkpointer = checkpointer
        self.idle = idle
        self._armed = checkpointer is not None
        self.signalled = 0  # the number of the first signal while armed
        self._previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS if jax.process_count() == 1 else (signal.SIGINT,):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signalled:
            raise Interrupted(f"interrupted ({name}) again: stopped at once, without saving the step in progress; "
                              f"run the same command to resume from the newest checkpoint", signum)
        if not self._armed or jax.process_count() > 1:
            raise Interrupted(f"interrupted ({name}) {self.idle}", signum)
        self.signalled = signum

    @contextlib.contextmanager
    def armed(self, checkpointer: Checkpointer,
              after: str = "after the last step; the checkpoints completed so far are kept"):
        """Within: a signal asks for a save at the next step boundary. After: `idle` is `after`."""
        self.checkpointer, self._armed = checkpointer, True
        try:
            yield self
        finally:
            self._armed, self.idle = False, after

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop (every process gets the same answer)."""
        if jax.process_count() > 1:
            return self.checkpointer.manager.reached_preemption(step)
        return bool(self.signalled)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
