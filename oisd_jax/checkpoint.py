"""Checkpoints: train state + data-iterator state + PRNG key + config, one orbax step each.

A thin layer over `orbax.checkpoint.CheckpointManager` (orbax-checkpoint 0.12.8):

- one step directory `<dir>/<step>/` with four items: `state` (the train-state pytree,
  `StandardSave`: tensorstore/OCDBT, written shard-by-shard by the processes that hold
  them), `data` (the input pipeline's state), `rng` (the PRNG key as JSON) and `config`;
- atomic: orbax writes `<step>.orbax-checkpoint-tmp` and renames it once every process
  has finished (on GCS it writes a commit marker instead), so a crash mid-save leaves no
  half-written step that `latest_step()` would return; leftover tmp folders are removed
  when a manager opens the directory;
- async: `save` returns once device arrays are copied to host memory (so the caller may
  donate or overwrite them right away); the files are written in the background. Call
  `wait_until_finished()` before reading the files or exiting;
- keep-N: only the newest `max_to_keep` steps are kept;
- restore reads straight into the shardings of an abstract pytree (ShapeDtypeStructs with
  `.sharding`), so no host ever holds the whole model; a latest step that cannot be read
  is skipped with a warning and the previous one is used; the unreadable folder is moved
  aside to `<step>.corrupt-<n>` (kept for inspection) so the re-trained step can be saved;
- loud: the folder's writability is checked when the Checkpointer opens it (before any
  training), a failed save raises CheckpointError naming the step and folder, and waits
  on async saves are bounded (`wait_timeout_s`) so a stuck writer cannot hang the run.

Every process must call every method (orbax coordinates the processes; process 0 writes
the JSON items and finalises the step).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import sys
import threading
import uuid
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from oisd_jax.cli import UserError, debug_requested

ITEMS = ("state", "data", "rng", "config")  # the orbax items of every step (run_files reads them too)
_BYTES_KEY = "__bytes_b64__"


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # the train-state pytree, sharded like the abstract state given to restore
    data_state: Any  # as given to save (JSON values; bytes round-trip too)
    rng: jax.Array | None  # same kind as saved: typed key or raw uint32 key data
    config: dict | None  # the saved config as a plain dict (tuples come back as lists)


def _encode_json(x: Any) -> Any:
    """JSON-safe copy; bytes (e.g. a serialized iterator state) become base64 strings."""
    if isinstance(x, (bytes, bytearray)):
        return {_BYTES_KEY: base64.b64encode(bytes(x)).decode("ascii")}
    if isinstance(x, dict):
        return {str(k): _encode_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode_json(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _decode_json(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {_BYTES_KEY}:
            return base64.b64decode(x[_BYTES_KEY])
        return {k: _decode_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode_json(v) for v in x]
    return x


def _config_to_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(_encode_json(dict(config)), default=str))


def _rng_to_json(rng: Any) -> dict | None:
    if rng is None:
        return None
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(rng)) if typed else None
    data = jax.random.key_data(rng) if typed else rng
    if isinstance(data, jax.Array) and not data.is_fully_addressable:
        data = data.addressable_data(0)  # keys are replicated: every shard is the whole key
    data = np.asarray(data)
    return {"typed": typed, "impl": impl, "dtype": str(data.dtype), "shape": list(data.shape),
            "data": data.ravel().tolist()}


def _rng_from_json(d: dict | None) -> jax.Array | None:
    if not d:
        return None
    data = np.asarray(d["data"], dtype=d["dtype"]).reshape(d["shape"])
    if d["typed"]:
        return jax.random.wrap_key_data(data, impl=d["impl"])
    return jax.numpy.asarray(data)


class _OneLineOrbaxErrors(logging.Filter):
    """Drop the tracebacks orbax's background threads log (through absl) when a save fails,
    4 of them, ~320 lines, for one full disk (measured, orbax 0.12.8): the failure reaches
    the caller as one CheckpointError, and the log keeps orbax's one-line messages.
    OISD_DEBUG=1 / --debug keeps the tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in record.pathname and not debug_requested():
            record.exc_info, record.exc_text = None, None
        return True


_ORBAX_FILTER = _OneLineOrbaxErrors()


def _raised_in_orbax(exc_info) -> bool:
    tb = exc_info[2] if exc_info else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _DropOrbaxOrphanTasks(logging.Filter):
    """Drop asyncio's 'Task exception was never retrieved' records for orbax's write tasks.
    When a save hits a full disk, each tensorstore fragment write that fails after the first
    is an orphaned task; when the garbage collector reaches it (before exit or not, so the
    count varies run to run) asyncio logs it with a full traceback: one per fragment, 20+
    for the tiny model (seen in CI, orbax 0.12.8). The first failure reaches the caller as
    a CheckpointError. Other asyncio records, and all under OISD_DEBUG, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (debug_requested() or not str(record.msg).startswith("Task exception was never retrieved")
                or not _raised_in_orbax(record.exc_info))


_ASYNCIO_FILTER = _DropOrbaxOrphanTasks()


def _drop_closed_loop_errors(previous):
    """sys.unraisablehook: after a failed async save, tensorstore's write callbacks may land on
    the save thread's asyncio loop that orbax already closed, and each prints a 6-line
    'RuntimeError: Event loop is closed' traceback (dozens on a full disk, measured); the
    save's failure itself reaches the caller as a CheckpointError. Anything else, and
    everything under OISD_DEBUG, goes to the previous hook."""
    def hook(u):
        if u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed" and not debug_requested():
            return
        previous(u)
    hook.oisd_closed_loop_filter = True
    return hook


class CheckpointError(UserError):
    """A checkpoint could not be written (or its folder cannot be)."""


def check_writable(directory: str) -> None:
    """Create `directory` and write/remove a probe file in it, or raise CheckpointError."""
    if "://" in directory:
        return  # cloud storage: orbax reports its own errors
    probe = os.path.join(directory, f".write-probe-{uuid.uuid4().hex}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"checkpoint folder {directory} is not writable ({e.strerror or e}); "
                              "nothing would be saved") from None


def move_aside(step_dir: str) -> str | None:
    """Rename `<dir>/<step>` to `<dir>/<step>.corrupt-<n>` (first free n); returns the new path."""
    if "://" in step_dir or not os.path.isdir(step_dir):
        return None
    n = 1
    while os.path.exists(f"{step_dir}.corrupt-{n}"):
        n += 1
    os.rename(step_dir, f"{step_dir}.corrupt-{n}")
    return f"{step_dir}.corrupt-{n}"


class Checkpointer:
    """Save / resume a training run in `directory` (created if missing; may be gs://...)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, wait_timeout_s: float = 1800.0):
        self.directory = os.fspath(directory)
        self.wait_timeout_s = float(wait_timeout_s)
        self._in_flight: int | None = None  # the step of the save started last, until it is known done
        logging.getLogger("absl").addFilter(_ORBAX_FILTER)  # once: a logger holds a filter once
        logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)
        if not getattr(sys.unraisablehook, "oisd_closed_loop_filter", False):
            sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)
        if jax.process_index() == 0:
            check_writable(self.directory)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # a crash mid-save leaves a tmp folder: drop it
            create=True)
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, *, data_state: Any = None, rng: jax.Array | None = None,
             config: Any = None) -> bool:
        """Start saving `step` (async unless disabled). False if that step already exists."""
        self.wait_until_finished()  # the previous async save's failure is named as its own step's
        if step in self.all_steps():
            warnings.warn(f"checkpoint step {step} already exists in {self.directory}; not saved",
                          RuntimeWarning, stacklevel=2)
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode_json({"data_state": data_state})),
            rng=ocp.args.JsonSave(_rng_to_json(rng) or {}),
            config=ocp.args.JsonSave(_config_to_dict(config) or {}))
        try:
            self._in_flight = step
            return bool(self._manager.save(step, args=args, force=True))
        except Exception as e:  # orbax/tensorstore/OS errors: the run must stop, not go on unsaved
            raise CheckpointError(f"checkpoint step {step} could not be saved to {self.directory}: "
                                  f"{type(e).__name__}: {e}") from e

    # ------------------------------------------------------------------ query
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ------------------------------------------------------------------ restore
    def restore(self, step: int | None = None, abstract_state: Any = None, *,
                fallback: bool = True) -> Restored:
        """Restore `step` (None = the newest readable one) into `abstract_state`'s shardings.

        abstract_state: pytree like the saved state with jax.ShapeDtypeStruct leaves carrying
          `.sharding` (e.g. from `jax.eval_shape` + the param shardings); arrays are read
          directly into those shardings and dtypes. None restores as saved (single host).
        fallback: with step=None, a step that fails to read is skipped with a warning and
          the next older one is tried.
        """
        self.wait_until_finished()  # a save in flight is not readable yet
        candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        errors = []
        for s in candidates:
            try:
                return self._restore_step(s, abstract_state)
            except Exception as e:  # orbax/tensorstore raise many types for unreadable files
                if step is not None or not fallback:
                    raise
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                msg = (f"checkpoint step {s} in {self.directory} is unreadable "
                       f"({type(e).__name__}: {str(e)[:300]}); trying an older step")
                if jax.process_index() == 0:
                    moved = move_aside(os.path.join(self.directory, str(s)))
                    msg += f"; moved it to {moved}" if moved else ""
                logging.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                self._manager.reload()
        raise RuntimeError(f"no readable checkpoint in {self.directory}:\n" + "\n".join(errors))

    def _restore_step(self, step: int, abstract_state: Any) -> Restored:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            rng=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        if out.data is None or out.rng is None or out.config is None or out.state is None:
            raise ValueError(f"checkpoint step {step} lacks an item")
        return Restored(step=step, state=out.state, data_state=_decode_json(out.data)["data_state"],
                        rng=_rng_from_json(out.rng), config=out.config or None)

    # ------------------------------------------------------------------ lifecycle
    def wait_until_finished(self) -> None:
        """Block until async saves are on disk, at most `wait_timeout_s`; raise
        CheckpointError for a failed or stuck save."""
        box: list[BaseException] = []

        def wait():
            try:
                self._manager.wait_until_finished()
            except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
                box.append(e)
        t = threading.Thread(target=wait, name="checkpoint-wait", daemon=True)
        t.start()
        t.join(self.wait_timeout_s)
        what = "a checkpoint" if self._in_flight is None else f"checkpoint step {self._in_flight}"
        if t.is_alive():
            raise CheckpointError(f"saving {what} to {self.directory} did not finish within "
                                  f"{self.wait_timeout_s:g} s (a full or unresponsive disk?)")
        if box:
            raise CheckpointError(f"saving {what} to {self.directory} failed: "
                                  f"{type(box[0]).__name__}: {box[0]}") from box[0]
        self._in_flight = None

    def close(self) -> None:
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
