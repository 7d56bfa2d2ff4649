"""Entry point: `python -m hybridhash_jax.main --config=configs/cifar10.py --workdir=DIR`.

Thin on purpose: parses flags, loads and checks the config (before the heavy imports, so a bad
field fails at once), joins the other processes of a multi-host run, logs the devices and hands off
to `train.train_and_evaluate` (or `evaluate.evaluate_checkpoint` with `--config.eval_only=True`),
then prints a summary: the final and best mAP, where the results are and the next command. A
notebook calls those functions directly. `cli.console` gives the log level, the `error:` line and
the exit statuses (docs/training.md, "Console").
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hybridhash_jax import cli
from hybridhash_jax import config_lib
from hybridhash_jax import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-host runs without auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "warning", cli.LOG_LEVELS, cli.LOG_LEVEL_HELP)
flags.mark_flags_as_required(["config", "workdir"])


def _config():
  """The parsed config, validated; config_flags defers a file it cannot load until now."""
  config = _CONFIG.value
  try:
    eval_only = config.eval_only
  except OSError as e:
    raise errors.NotFoundError(f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}: "
                               f"cannot load it ({e.__cause__ or e})") from None
  (config_lib.validate if eval_only else config_lib.validate_training)(config)
  return config


def summary(results: dict, workdir: str) -> str:
  """The lines a run ends on: its mAP, its files and the next command."""
  ev = os.path.join(workdir, "eval")
  best = results["best"]
  figures = ", ".join(os.path.join(ev, f) for f in ("pr_curve.png", "precision_at_n.png", "retrieval_grid.png"))
  return "\n".join([
      f"final mAP@{results['top_k']} {results['map']:.4f} at step {results['step']}; best {best['map']:.4f} at step "
      f"{best['step']}",
      f"results: {os.path.join(ev, 'results.json')}",
      f"figures: {figures}",
      f"next: python -m hybridhash_jax.index build --workdir={workdir} --images=DIR "
      f"--index={os.path.join(workdir, 'index')}  (DIR: a folder of images; docs/search.md)"])


def main(argv):
  del argv
  with cli.console(_LOG_LEVEL.value):
    config = _config()
    cli.compilation_cache()
    import jax
    from hybridhash_jax import sharding
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # Imported after distributed init: nothing may touch the backend before it.
    from hybridhash_jax import evaluate
    from hybridhash_jax import train

    if jax.process_index() != 0:
      logging.set_verbosity(logging.WARNING)
    logging.info("JAX %s, process %d/%d, %d local / %d global devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices())
    if config.eval_only:
      results = evaluate.evaluate_checkpoint(config, _WORKDIR.value)
    else:
      results = train.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
      print(summary(results, _WORKDIR.value), flush=True)


if __name__ == "__main__":
  app.run(main)
