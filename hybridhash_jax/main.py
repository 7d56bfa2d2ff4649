"""Entry point: `python -m hybridhash_jax.main --config=configs/cifar10.py --workdir=DIR`.

Thin on purpose: parses flags, joins the other processes of a multi-host run, logs the
devices and hands off to `train.train_and_evaluate` (or `evaluate.evaluate_checkpoint`
with `--config.eval_only=True`). A notebook calls those functions directly.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from hybridhash_jax import errors
from hybridhash_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-host runs without auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # Imported after distributed init: nothing may touch the backend before it.
  from hybridhash_jax import evaluate
  from hybridhash_jax import train

  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info("JAX %s, process %d/%d, %d local / %d global devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices())
  config = _CONFIG.value
  try:
    if config.eval_only:
      evaluate.evaluate_checkpoint(config, _WORKDIR.value)
    else:
      train.train_and_evaluate(config, _WORKDIR.value)
  except (errors.UserError, FileNotFoundError) as e:
    # Bad input (a config field, a data file, a checkpoint, a missing dataset or weights file) is not a bug:
    # one clear message, no trace. Anything else keeps its traceback.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
