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

import jax
import orbax.checkpoint as ocp

MODEL_FIELDS_THAT_SHAPE_PARAMS = (
    "img_size", "patch_size", "embed_dims", "num_heads", "depths", "bits", "mlp_ratio",
    "interaction", "hash_global",
)


def _jsonable(tree: Any) -> Any:
  return json.loads(json.dumps(tree, default=list))


def model_mismatch(saved: dict, wanted: dict) -> list[str]:
  """Names the model fields whose values differ, as 'field: saved X, config Y'."""
  out = []
  for k in MODEL_FIELDS_THAT_SHAPE_PARAMS:
    a, b = _jsonable(saved.get(k)), _jsonable(wanted.get(k))
    if a != b:
      out.append(f"model.{k}: checkpoint has {a}, config has {b}")
  return out


def check_compatible(saved_config: dict, model_config: dict, where: str) -> None:
  diffs = model_mismatch(saved_config.get("model", {}), model_config)
  if diffs:
    raise ValueError(f"checkpoint {where} was written for another model:\n  " + "\n  ".join(diffs))


def save_params(directory: str, params: Any, config: dict, step: int = 0) -> None:
  """Writes a params-only checkpoint (e.g. converted weights) that evaluation can restore."""
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(_jsonable(config))))
    mngr.wait_until_finished()


def restore_params(directory: str, abstract_params: Any, model_config: dict, step: int | None = None):
  """Restores params (onto the shardings of `abstract_params`) and the saved config.

  Refuses, naming the fields, a checkpoint whose model differs from `model_config`.
  """
  with ocp.CheckpointManager(directory) as mngr:
    step = mngr.latest_step() if step is None or step < 0 else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {directory}")
    saved_config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    check_compatible(saved_config, _jsonable(model_config), f"{directory} (step {step})")
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  return restored["params"], saved_config, step
