"""Orbax checkpoints: one layout for training runs, converted weights and evaluation.

A checkpoint directory is an orbax `CheckpointManager` root. Every step holds the items
  params     the model parameters (what evaluation and `init_checkpoint` need),
  config     the run's config as JSON (to refuse a checkpoint of another model),
and a training step adds
  train      optimiser state, memory bank, step and rng,
  data_iter  the grain iterator state.
Converted weights (`python -m hybridhash_jax.convert`) are a step-0 checkpoint with
`params` and `config` alone, so evaluation and `init_checkpoint` read them like any run.
"""

import json
from typing import Any

from etils import epath
import grain
import orbax.checkpoint as ocp

from hybridhash_jax import errors
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


def save_params(directory: str, params: Any, config: dict, step: int = 0) -> None:
  """Writes a params-only checkpoint (e.g. converted weights) that evaluation can restore."""
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(_jsonable(config))))
    mngr.wait_until_finished()


def _open(directory: str) -> ocp.CheckpointManager:
  if not epath.Path(directory).is_dir():
    raise errors.NotFoundError(
        f"no checkpoint directory {directory}. For NesT-B weights, convert them first: python -m "
        "hybridhash_jax.convert --source nest_base_jx.safetensors --format torch --mode nest --config CONFIG "
        "--output DIR (see docs/training.md, 'NesT-B weights').")
  # The options read_only implies, given, so that orbax does not warn that it set them.
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  return ocp.CheckpointManager(directory, options=options)


def _saved_config(mngr: ocp.CheckpointManager, directory: str, step: int | None) -> tuple[dict, int]:
  step = mngr.latest_step() if step is None or step < 0 else step
  if step is None:
    raise errors.NotFoundError(f"no checkpoint found in {directory}")
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"], step


def read_config(directory: str, step: int | None = None) -> tuple[dict, int]:
  """The config saved with a checkpoint, and its step (the latest by default)."""
  with _open(directory) as mngr:
    return _saved_config(mngr, directory, step)


def restore_params(directory: str, abstract_params: Any, config: dict, step: int | None = None,
                   fields=MODEL_FIELDS):
  """Restores params (onto the shardings of `abstract_params`) and the saved config.

  Refuses, naming them, a checkpoint whose config differs from `config` in `fields`.
  """
  with _open(directory) as mngr:
    saved_config, step = _saved_config(mngr, directory, step)
    check_compatible(saved_config, config, f"{directory} (step {step})", fields)
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  return restored["params"], saved_config, step


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """An async manager: saving overlaps the next train steps."""
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True))


def save_train(mngr: ocp.CheckpointManager, step: int, params: Any, train: Any, data_iter: Any,
               config: dict) -> None:
  """Saves a training step: everything a resumed run needs to continue bit for bit."""
  mngr.save(step, force=True, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      train=ocp.args.StandardSave(train),
      data_iter=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(_jsonable(config))))


def restore_train(mngr: ocp.CheckpointManager, step: int, abstract_params: Any, abstract_train: Any,
                  data_iter: Any, config: dict):
  """Restores a training step onto the given shardings; the data iterator is restored in place."""
  where = f"{mngr.directory} (step {step})"
  saved_config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  check_compatible(saved_config, config, where, RESUME_FIELDS)
  restored = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      train=ocp.args.StandardRestore(abstract_train),
      data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
  return restored["params"], restored["train"]
