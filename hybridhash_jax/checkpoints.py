"""Orbax checkpoints: one layout for training runs, converted weights and evaluation.

A checkpoint directory is an orbax `CheckpointManager` root. Every step holds the items
  params     the model parameters (what evaluation and `init_checkpoint` need),
  config     the run's config as JSON (to refuse a checkpoint of another model),
  digest     the crc32 of every array's bytes, by item and key path,
and a training step adds
  train      optimiser state, memory bank, step and rng,
  data_iter  the grain iterator state.
Converted weights (`python -m hybridhash_jax.convert`) are a step-0 checkpoint with
`params`, `config` and `digest` alone, so evaluation and `init_checkpoint` read them like any run.

Every reader (evaluation, index, export, the server, `init_checkpoint`, a resumed run) goes through
`restore`: the saved config is read once, checked, and the arrays restored onto targets built from it.
OCDBT's chunks carry no checksum of their values (bytes flipped inside one restore without an error),
hence the digest, checked after every restore. A step that cannot be read (a checksum or decoding
error, a truncated or missing file, unreadable metadata, a commit marker without its data) is an
`errors.CheckpointError` naming the step and the file; `resume` moves such steps aside to
`<step>.unreadable-<time>` and continues from the newest readable one.
"""

import contextlib
import dataclasses
import json
import logging as py_logging
import time
from typing import Any, Callable
import zlib

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from hybridhash_jax import errors
from hybridhash_jax import io_errors
from hybridhash_jax import models

MODEL_FIELDS = tuple(f"model.{k}" for k in models.ARCHITECTURE_FIELDS)
# A params-only start (`init_checkpoint`) may have another code length (NesT-B converted once serves
# every bit length, the hash layer keeping its initialisation) and token layout (no parameter of its own).
INIT_FIELDS = tuple(f for f in MODEL_FIELDS if f not in ("model.bits", "model.token_layout"))
# Resuming also needs the same bank shape, split and data order.
RESUME_FIELDS = MODEL_FIELDS + (
    "seed", "batch_size", "data.name", "data.protocol", "data.num_classes", "data.split_seed",
    "loss.memory_bank_size")


def _jsonable(tree: Any) -> Any:
  return json.loads(json.dumps(tree, default=list))


def _get(tree: dict, dotted: str) -> Any:
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def check_compatible(saved_config: dict, config: dict, where: str, fields=MODEL_FIELDS) -> None:
  """Refuses a checkpoint whose config differs in `fields`, naming each one."""
  saved_config, config = _jsonable(saved_config), _jsonable(config)
  diffs = [f"{f}: checkpoint has {_get(saved_config, f)!r}, config has {_get(config, f)!r}"
           for f in fields if _get(saved_config, f) != _get(config, f)]
  if diffs:
    raise errors.ConfigError(f"checkpoint {where} was written for another model or run:\n  " + "\n  ".join(diffs))


DIGEST = "digest"


class UnreadableStepError(errors.CheckpointError):
  """A committed step whose files cannot be read back as written; names the step, the file and the cause."""

  def __init__(self, directory, step: int, item: str, cause: str):
    self.step, self.path, self.cause = step, str(epath.Path(directory) / str(step) / item), cause
    super().__init__(f"checkpoint step {step} is unreadable: {self.path}: {cause}")


@dataclasses.dataclass(frozen=True)
class Restored:
  items: dict  # item name -> the restored tree (or the data iterator, restored in place)
  config: dict  # the config saved with the step
  step: int


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def _digest(tree: Any) -> dict:
  """key path -> dtype and crc32 of the array's bytes (C order), the same on any sharding."""
  return {jax.tree_util.keystr(path): {"dtype": str(np.dtype(x.dtype)), "crc32": zlib.crc32(_host(x).tobytes())}
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_digest(directory, step: int, item: str, tree: Any, saved: dict) -> None:
  """Compares the restored arrays with the digest written with them (arrays restored in another dtype are skipped)."""
  for key, now in _digest(tree).items():
    want = saved.get(key)
    if want is not None and want["dtype"] == now["dtype"] and want["crc32"] != now["crc32"]:
      raise UnreadableStepError(directory, step, item, f"DATA_LOSS: {key} differs from the checksum written with it "
                                f"(crc32 {now['crc32']:08x}, saved {want['crc32']:08x})")


def _cause(e: BaseException) -> str:
  """The innermost error's first line: the one that says what is wrong with which file."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax's log lines where they say nothing to the user: it logs every failed read (with its trace) before
  raising, and the raised error says it once; it warns of a read-only manager and of an overridden handler,
  which are meant."""
  previous = logging.get_absl_logger().level
  logging.get_absl_logger().setLevel(py_logging.CRITICAL + 1)
  try:
    yield
  finally:
    logging.get_absl_logger().setLevel(previous)


def _read(mngr: ocp.CheckpointManager, step: int, item: str, args) -> Any:
  if not (epath.Path(mngr.directory) / str(step) / item).exists():
    raise UnreadableStepError(mngr.directory, step, item, "missing (a commit marker without its data)")
  io_errors.silence_leftovers()  # before the read: a failed one's echoes may come before it returns
  try:
    with _quiet_orbax():
      return mngr.restore(step, args=ocp.args.Composite(**{item: args}))[item]
  except Exception as e:  # noqa: BLE001  # sorted by io_errors.is_damage; anything else is re-raised as it came
    if not io_errors.is_damage(e):
      raise
    raise UnreadableStepError(mngr.directory, step, item, _cause(e)) from e


def _restore_step(mngr: ocp.CheckpointManager, step: int, targets: Callable[[dict], dict], config: dict | None,
                  fields) -> Restored:
  saved = _read(mngr, step, "config", ocp.args.JsonRestore())
  if config is not None:
    check_compatible(saved, config, f"{mngr.directory} (step {step})", fields)
  items = {}
  for name, target in targets(saved).items():
    args = grain.checkpoint.CheckpointRestore(target) if name == "data_iter" else ocp.args.StandardRestore(target)
    items[name] = _read(mngr, step, name, args)
  if (epath.Path(mngr.directory) / str(step) / DIGEST).exists():
    digest = _read(mngr, step, DIGEST, ocp.args.JsonRestore())
    for name in items.keys() & digest.keys():
      _check_digest(mngr.directory, step, name, items[name], digest[name])
  return Restored(items, saved, step)


@contextlib.contextmanager
def saving(mngr: ocp.CheckpointManager):
  """A save (or the wait for one) that fails to write becomes a `WriteError` naming the checkpoint folder; the
  steps committed before it stay readable."""
  io_errors.silence_leftovers()
  try:
    yield
  except Exception as e:  # noqa: BLE001  # sorted by _write_failure; anything else is re-raised as it came
    failure = io_errors.write_failure(e)
    if failure is None:
      raise
    io_errors.settle_writers()  # the save's other items: their failures are this one, said once
    raise errors.WriteError(mngr.directory, failure) from e


def _open(directory: str) -> ocp.CheckpointManager:
  if not epath.Path(directory).is_dir():
    raise errors.NotFoundError(
        f"no checkpoint directory {directory}. For NesT-B weights, convert them first: python -m "
        "hybridhash_jax.convert --source nest_base_jx.safetensors --format torch --mode nest --config CONFIG "
        "--output DIR (see docs/training.md, 'NesT-B weights').")
  # The options read_only implies, given, so that orbax does not warn that it set them.
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  with _quiet_orbax():  # its notes on a read-only manager
    return ocp.CheckpointManager(directory, options=options)


def restore(directory: str, targets: Callable[[dict], dict], config: dict | None = None, fields=MODEL_FIELDS,
            step: int | None = None) -> Restored:
  """A committed step of `directory` (the latest, or `step`), for every reader of checkpoints.

  `targets(saved_config)` gives the item -> abstract tree (shapes, dtypes, shardings) to restore onto.
  Refuses, naming them, a checkpoint whose config differs from `config` in `fields`; an unreadable step
  is a `CheckpointError` naming it, its file, and the steps that are readable.
  """
  with _open(directory) as mngr:
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      raise errors.NotFoundError(f"no checkpoint found in {directory}")
    step = steps[0] if step is None or step < 0 else step
    if step not in steps:
      raise errors.CheckpointError(f"no step {step} in {directory}; its steps: {', '.join(map(str, steps))}")
    try:
      return _restore_step(mngr, step, targets, config, fields)
    except UnreadableStepError as e:
      readable = [s for s in steps if s != step and _readable(mngr, s, targets)]
      raise errors.CheckpointError(
          f"{e}. Readable steps: {', '.join(map(str, readable)) if readable else 'none'}") from None


def _readable(mngr: ocp.CheckpointManager, step: int, targets: Callable[[dict], dict]) -> bool:
  try:
    _restore_step(mngr, step, targets, None, ())
  except UnreadableStepError:
    return False
  return True


def restore_params(directory: str, abstract_params: Any, config: dict, step: int | None = None,
                   fields=MODEL_FIELDS):
  """Params (onto the shardings of `abstract_params`), the saved config and the step: `restore` of params alone."""
  r = restore(directory, lambda saved: {"params": abstract_params}, config, fields, step)
  return r.items["params"], r.config, r.step


def resume(mngr: ocp.CheckpointManager, targets: Callable[[dict], dict], config: dict,
           fields=RESUME_FIELDS) -> Restored | None:
  """The newest readable step of a training run (None for a new run).

  Each unreadable step after it is moved aside to `<step>.unreadable-<time>`, with one warning. When no
  step is readable, nothing is moved and the error lists them.
  """
  unreadable = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = _restore_step(mngr, step, targets, config, fields)
    except UnreadableStepError as e:
      unreadable.append(e)
      continue
    for e in unreadable:
      _move_aside(mngr, e)
    if unreadable:
      mngr.reload()
    return restored
  if unreadable:
    raise errors.CheckpointError(f"no readable checkpoint in {mngr.directory}: " +
                                 "; ".join(f"step {e.step}: {e.path}: {e.cause}" for e in unreadable))
  return None


def _move_aside(mngr: ocp.CheckpointManager, e: UnreadableStepError) -> None:
  """Keeps the damaged step for inspection, out of the manager's sight (not a step name, never deleted)."""
  root = epath.Path(mngr.directory)
  aside = root / f"{e.step}.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
  if jax.process_index() == 0:
    (root / str(e.step)).rename(aside)
  logging.warning("Checkpoint step %d is unreadable (%s: %s); moved it to %s.", e.step, e.path, e.cause, aside)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"checkpoint step {e.step} moved aside")


def _one_writer_per_host() -> None:
  """On one host, writes each replicated array from one device.

  Orbax's replica-parallel writing splits a replicated array across its replicas so that several hosts share
  the bytes; on one host they pass through the same memory anyway, and the split costs a device slice per
  replica and array (on 4 devices, thousands of small compiles at a run's first save).
  """
  if jax.process_count() == 1:
    with _quiet_orbax():  # its warning that a handler is overridden
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def save_params(directory: str, params: Any, config: dict, step: int = 0) -> None:
  """Writes a params-only checkpoint (e.g. converted weights) that evaluation can restore."""
  _one_writer_per_host()
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(_jsonable(config)),
        digest=ocp.args.JsonSave({"params": _digest(params)})))
    mngr.wait_until_finished()


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """An async manager: saving overlaps the next train steps."""
  _one_writer_per_host()
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True))


def save_train(mngr: ocp.CheckpointManager, step: int, params: Any, train: Any, data_iter: Any,
               config: dict) -> None:
  """Saves a training step: everything a resumed run needs to continue bit for bit, and its digest."""
  mngr.save(step, force=True, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      train=ocp.args.StandardSave(train),
      data_iter=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(_jsonable(config)),
      digest=ocp.args.JsonSave({"params": _digest(params), "train": _digest(train)})))
