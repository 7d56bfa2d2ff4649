"""Images/s of the list-file training pipeline at 224 against a plain single-process PIL loop.

  python experiments/bench_input.py [--num_images=256 --batch=32 --batches=12]

Generates JPEGs of 500x375 (NUS-WIDE/COCO-like) in a temporary folder, then times the grain
loader with 0, 1 and 2 workers (after one warm-up batch, which absorbs worker start-up) and the
baseline loop (open, convert RGB, resize 256, random crop 224, flip, to array) in the same run.
Prints JSON.
"""

import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from hybridhash_jax import config_lib
from hybridhash_jax import input_pipeline

_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "Generated JPEGs.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed batches per setting.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to time.")


def _write_dataset(root: str, n: int, num_classes: int = 21) -> None:
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:375, 0:500]
  lines = []
  for i in range(n):
    base = (np.sin(xx / (20 + i % 7)) + np.cos(yy / (15 + i % 5))) * 60 + 128
    img = np.clip(base[..., None] + rng.normal(0, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(root, f"{i}.jpg"), quality=90)
    labels = np.zeros(num_classes, int)
    labels[i % num_classes] = 1
    lines.append(f"{i}.jpg {' '.join(map(str, labels))}\n")
  for name in ("train.txt", "test.txt", "database.txt"):
    with open(os.path.join(root, name), "w", encoding="utf-8") as f:
      f.writelines(lines)


def _baseline(root: str, n: int, count: int) -> float:
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  for i in range(count):
    with Image.open(os.path.join(root, f"{i % n}.jpg")) as img:
      img = img.convert("RGB")
      w, h = img.size
      img = img.resize((int(256 * w / h), 256) if h <= w else (256, int(256 * h / w)), Image.BILINEAR)
      top, left = rng.integers(0, img.size[1] - 223), rng.integers(0, img.size[0] - 223)
      img = img.crop((left, top, left + 224, top + 224))
      if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
      np.asarray(img)
  return count / (time.perf_counter() - t0)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as root:
    _write_dataset(root, _NUM_IMAGES.value)
    c = config_lib.base_config()
    c.data.update(name="listfile", root=root, list_dir=root, num_classes=21)
    splits = input_pipeline.build_splits(c)
    count = _BATCH.value * _BATCHES.value
    result = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared, noisy)",
              "img_size": 224, "source_image": "500x375 JPEG", "batch": _BATCH.value,
              "baseline_pil_loop_images_per_s": round(_baseline(root, _NUM_IMAGES.value, count), 1)}
    for workers in map(int, _WORKERS.value):
      it = iter(input_pipeline.train_loader(c, splits, seed=0, local_batch_size=_BATCH.value, worker_count=workers))
      next(it)  # warm-up: worker start-up and the first reads
      t0 = time.perf_counter()
      for _ in range(_BATCHES.value):
        batch = next(it)
      assert batch["image"].shape == (_BATCH.value, 224, 224, 3)
      result[f"grain_workers_{workers}_images_per_s"] = round(count / (time.perf_counter() - t0), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
