"""One device check: train step, ranking kernels and encoding on one accelerator, printed as one JSON table.

  python -m experiments.device_check            # one H100/H200: under 8 minutes (--budget_s guards it)
  python -m experiments.device_check --smoke    # tiny sizes, runs on CPU in well under a minute (a test does)

Rows:
  train   the paper's model, bfloat16, batch 64 and 128, attention xla | cudnn, remat none | full:
          img/s, MFU, XLA's step memory estimate and the process's peak device memory so far
          (`experiments/bench_train.py`'s `measure`);
  map     mAP timings at CIFAR-10 (1,000 x 54,000, K = all), ImageNet-100 (5,000 x 128,503, K = 1,000)
          and 5,000 x 1,000,000 (K = 1,000) sizes, for both ranking kernels (`experiments/bench_map.py`;
          the host kernel on the machine's CPU cores, skipped where numba is not installed);
  encode  the paper's model in evaluation mode, bfloat16, img/s.
A row that fails records its error and the check goes on; cuDNN rows off GPU are skipped, as are rows
left when --budget_s runs out. Synthetic data throughout: no dataset, no input pipeline.

Packages. The check needs jax, flax, optax and orbax (with absl and etils), plus ml-collections (config_lib) and
grain (imported by train.py and checkpoints.py); tensorflow-datasets is imported only by the CIFAR-10 tfds source
and is not needed. numba (the CPU ranking kernel) is optional: without it the host-kernel rows are skipped. On a
GPU machine whose Python 3.12 has the first four but not ml-collections or grain, fetch those wheels elsewhere,
in the repository root:
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
copy the checkout with `.whl` to the GPU machine, and run there:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 -m experiments.device_check
"""

import argparse
import functools
import importlib.util
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_map
from experiments import bench_train
from hybridhash_jax import config_lib
from hybridhash_jax import input_pipeline
from hybridhash_jax import metrics
from hybridhash_jax import models

FULL = dict(batches=(64, 128), steps=10, warmup=2, model={}, encode_batch=256, repeats=2,
            map_sizes=dict(cifar10=(1000, 54000, -1), imagenet100=(5000, 128503, 1000),
                           million=(5000, 1_000_000, 1000)))
SMOKE = dict(batches=(2,), steps=1, warmup=1, encode_batch=4, repeats=1,  # two levels: the least to compile
             model=dict(img_size=16, patch_size=2, embed_dims=(16, 32), num_heads=(2, 4), depths=(1, 1)),
             map_sizes=dict(cifar10=(20, 300, -1), imagenet100=(30, 500, 50)))


def train_config(sizes, batch, attention, remat):
  config = config_lib.base_config()
  config.model.update(sizes["model"], dtype="bfloat16", attention=attention, remat=remat)
  config.batch_size = batch
  return config


def encode_row(sizes) -> dict:
  """Forward passes of the evaluation model on one uint8 batch, as the evaluator runs them."""
  config = train_config(sizes, sizes["encode_batch"], "xla", "none")
  model = models.from_config(config.model)
  size, b = config.model.img_size, sizes["encode_batch"]
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (b, size, size, 3), dtype=np.uint8))
  params = jax.jit(model.init)(jax.random.key(0), images[:1].astype(jnp.float32))["params"]
  encode = jax.jit(lambda p, x: model.apply({"params": p}, input_pipeline.normalize(x)))
  jax.block_until_ready(encode(params, images))
  steps = max(sizes["steps"], 1)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = encode(params, images)
  jax.block_until_ready(out)
  return dict(batch_size=b, dtype="bfloat16", images_per_s=b * steps / (time.perf_counter() - t0))


def rows(sizes):
  """(section, name, thunk) for every row, in the order they run."""
  for batch in sizes["batches"]:
    for attention in ("xla", "cudnn"):
      for remat in ("none", "full"):
        yield "train", f"batch{batch}_{attention}_remat-{remat}", (
            lambda b=batch, a=attention, r=remat: bench_train.measure(
                train_config(sizes, b, a, r), steps=sizes["steps"], warmup=sizes["warmup"]))
  for name, (queries, db, top_k) in sizes["map_sizes"].items():
    data = functools.cache(lambda q=queries, n=db: bench_map.make_data(q, n, 64, 100, 0.2))  # once per size
    for kernel in metrics.KERNELS:
      yield "map", f"{name}_{kernel}", (
          lambda d=data, k=kernel, q=queries, n=db, t=top_k: dict(
              bench_map.time_kernel(d(), t, sizes["repeats"], kernel=k), queries=q, db=n, top_k=t))
  yield "encode", "paper_eval", lambda: encode_row(sizes)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CPU")
  parser.add_argument("--budget_s", type=float, default=450.0, help="skip the rows left after this many seconds")
  args = parser.parse_args(argv)
  sizes = SMOKE if args.smoke else FULL
  start = time.perf_counter()
  dev = jax.devices()[0]
  table = dict(device_kind=dev.device_kind, platform=dev.platform, jax=jax.__version__, smoke=args.smoke,
               train={}, map={}, encode={})
  for section, name, thunk in rows(sizes):
    if "cudnn" in name and dev.platform != "gpu":
      table[section][name] = dict(skipped="cuDNN attention needs a GPU")
    elif name.endswith("_host") and importlib.util.find_spec("numba") is None:
      table[section][name] = dict(skipped="the host kernel needs numba, which is not installed")
    elif time.perf_counter() - start > args.budget_s:
      table[section][name] = dict(skipped=f"past --budget_s {args.budget_s:g}")
    else:
      t0 = time.perf_counter()
      try:
        table[section][name] = dict(thunk(), row_s=time.perf_counter() - t0)
      except Exception as e:  # noqa: BLE001  # one failing row must not lose the others
        table[section][name] = dict(error=f"{type(e).__name__}: {e}"[:500])
  table["total_s"] = time.perf_counter() - start
  print(json.dumps(table, indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
