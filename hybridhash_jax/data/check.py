"""The decode check before the first step: every image file of every split, read once, in parallel.

Without it a bad file surfaces when the pipeline first reads it, which for a database image is the
first evaluation, after hours of training. With `config.data.on_bad_image="error"` the first bad
file stops the run at once, named; with "skip" the bad files are listed in
`workdir/skipped_images.txt` and marked on their sources, so training never reads them, the memory
bank never pairs with them and evaluation drops them. Decoding runs in threads (PIL releases the GIL).
"""

from concurrent import futures
import os

from absl import logging
import numpy as np
import tqdm

from hybridhash_jax import errors
from hybridhash_jax.data import images
from hybridhash_jax.data import sources


def _problem(path: str) -> str | None:
  try:
    images.decode(path)
  except images.BadImageError as e:
    return str(e)
  return None


def check_images(split_sources: dict, on_bad_image: str, workdir: str | None, progress: bool = True,
                 threads: int | None = None) -> None:
  """Decodes every file of the `FileSource`s in `split_sources` ({split: source}); in-memory sources pass."""
  files = {split: src for split, src in split_sources.items() if isinstance(src, sources.FileSource)}
  paths = list(dict.fromkeys(src.path(i) for src in files.values() for i in range(len(src))))
  if not paths:
    return
  threads = threads or min(32, 2 * (os.cpu_count() or 1))
  with futures.ThreadPoolExecutor(threads) as pool:
    found = list(tqdm.tqdm(pool.map(_problem, paths), total=len(paths), desc="checking images", unit="img",
                           disable=not progress, mininterval=1.0))
  bad = {p: why for p, why in zip(paths, found) if why}
  if not bad:
    logging.info("Checked %d images: all decode.", len(paths))
    return
  if on_bad_image != "skip":
    first = next(iter(bad.values()))
    more = f"; {len(bad) - 1} more bad images" if len(bad) > 1 else ""
    raise images.BadImageError(f"{first}{more} (config.data.on_bad_image=skip skips them, listed in "
                               f"WORKDIR/{images.SKIP_LOG})")
  images.write_skipped(workdir, bad)
  for split, src in files.items():
    rows = [i for i in range(len(src)) if src.path(i) in bad]
    if len(rows) == len(src):
      raise errors.DataError(f"every image of the {split} split is unreadable (listed in WORKDIR/{images.SKIP_LOG})")
    src.valid[rows] = False
    if rows:
      logging.warning("Skipping %d of the %d %s images (unreadable).", len(rows), len(src), split)


def valid_rows(source) -> np.ndarray:
  """Which rows of `source` are usable: all but the files the check marked bad."""
  return np.asarray(getattr(source, "valid", np.ones(len(source), bool)))
