"""Throughput of the jitted train step: images/s, FLOPs (XLA cost analysis), MFU, peak memory.

  python experiments/bench_train.py --config=configs/cifar10.py --batch_size=64 --dtype=bfloat16

Feeds synthetic batches straight to the step (no input pipeline), so it measures the
model, loss and optimiser alone. Prints one JSON object.
"""

import json
import resource
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from hybridhash_jax import input_pipeline
from hybridhash_jax import sharding
from hybridhash_jax import train

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Only when run: device_check imports `measure`, and --config is main's flag too in one process."""
  config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config to benchmark.")
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
  flags.DEFINE_string("dtype", None, "Compute dtype override: float32 | bfloat16.")
  flags.DEFINE_integer("steps", 20, "Timed steps.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_integer("train_size", 10000, "Rows of the synthetic train set (memory bank size).")
  flags.DEFINE_float("peak_tflops", None, "Device peak TFLOP/s per chip, if not in the built-in table.")
  flags.DEFINE_bool("compile_only", False, "Report FLOPs and XLA's memory estimate without running.")


# Dense peak TFLOP/s per chip, by device kind prefix and compute dtype (vendor data sheets).
PEAK_TFLOPS = {
    ("NVIDIA H100", "bfloat16"): 989.0, ("NVIDIA H100", "float32"): 67.0,
    ("NVIDIA H200", "bfloat16"): 989.0, ("NVIDIA H200", "float32"): 67.0,
    ("NVIDIA A100", "bfloat16"): 312.0, ("NVIDIA A100", "float32"): 19.5,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5e", "bfloat16"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v6", "bfloat16"): 918.0,
}


def peak_tflops(kind: str, dtype: str, override: float | None = None) -> float | None:
  if override:
    return override
  for (prefix, dt), value in PEAK_TFLOPS.items():
    if kind.startswith(prefix) and dt == dtype:
      return value
  return None


def measure(config, *, steps: int = 20, warmup: int = 3, train_size: int = 10000, compile_only: bool = False,
            peak: float | None = None) -> dict:
  """Compiles the config's train step on synthetic batches and times it; returns the JSON fields."""
  mesh = sharding.make_mesh(config.mesh)
  n, c, size = train_size, config.data.num_classes, config.model.img_size
  splits = input_pipeline.Splits(train=range(n), query=range(0), database=range(0), num_classes=c, top_k=-1,
                                 name="synthetic")
  config.num_train_steps = 10**6
  setup = train.build(config, splits, mesh)
  state = train.initial_state(setup, config)
  step = train.make_train_step(setup, config)
  rng = np.random.default_rng(0)
  b = config.batch_size
  batch = sharding.global_batch(mesh, {
      "image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
      "label": np.eye(c, dtype=np.float32)[rng.integers(0, c, b)],
      "index": rng.permutation(n)[:b].astype(np.int32)})

  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  mem = compiled.memory_analysis()
  # What the step needs on one device, by XLA's buffer assignment: inputs + outputs (less the donated
  # state they share) + temporaries.
  xla_bytes = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                        - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  dev = jax.devices()[0]
  if compile_only:
    return dict(device_kind=dev.device_kind, config_img_size=size, dtype=config.model.dtype, batch_size=b,
                compile_s=compile_s, flops_per_step_per_device=flops, xla_step_memory_bytes=xla_bytes)
  for _ in range(max(warmup, 1)):  # at least one, untimed
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / steps

  kind = dev.device_kind
  peak = peak_tflops(kind, config.model.dtype, peak)
  achieved = flops / dt / 1e12  # the compiled program is one device's partition of the step
  stats = dev.memory_stats() or {}
  return dict(
      device_kind=kind, platform=dev.platform, num_devices=jax.device_count(), config_img_size=size,
      dtype=config.model.dtype, batch_size=b, step_s=dt, images_per_s=b / dt, compile_s=compile_s,
      flops_per_step_per_device=flops, tflops_per_s_per_device=achieved, peak_tflops_per_device=peak,
      mfu=(achieved / peak) if peak else None, loss=float(m["loss"]),
      peak_device_memory_bytes=stats.get("peak_bytes_in_use"), xla_step_memory_bytes=xla_bytes,
      host_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.batch_size:
    config.batch_size = FLAGS.batch_size
  if FLAGS.dtype:
    config.model.dtype = FLAGS.dtype
  print(json.dumps(measure(config, steps=FLAGS.steps, warmup=FLAGS.warmup, train_size=FLAGS.train_size,
                           compile_only=FLAGS.compile_only, peak=FLAGS.peak_tflops), indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
