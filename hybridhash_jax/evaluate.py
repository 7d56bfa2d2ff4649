"""Evaluation: encode the query and database sets, rank by Hamming distance, write the results.

Every example is encoded (padded batches with a mask, never a dropped remainder), codes
are put back in source order, and `workdir/eval/` receives `results.json` (final and
best mAP, each named as such), the PR curve and precision@N as JSON and PNG, and a PNG
grid of the top 10 results of a few queries.
"""

import json
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from hybridhash_jax import config_lib
from hybridhash_jax import encoding
from hybridhash_jax import input_pipeline
from hybridhash_jax import metric_writer
from hybridhash_jax import metrics
from hybridhash_jax import plots
from hybridhash_jax import sharding

GRID_QUERIES = 5
GRID_TOP = 10


def _results_path(workdir: str) -> str:
  return os.path.join(workdir, "eval", "results.json")


def load_history(workdir: str) -> dict:
  """Earlier evaluations of this run (after a resume), so `best` spans the whole run."""
  path = _results_path(workdir)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class Evaluator:
  """Encodes with a jitted, batch-sharded forward pass and computes the retrieval metrics."""

  def __init__(self, config: ml_collections.ConfigDict, model, mesh, params_shardings):
    self._config = config
    self._mesh = mesh
    self._local_batch = sharding.local_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    self._encode = encoding.encode_fn(model, mesh, params_shardings)

  def encode(self, params, source) -> tuple[np.ndarray, np.ndarray]:
    """Codes (tanh outputs) and labels of every example of `source`, in source order."""
    codes, labels = np.zeros((len(source), self._config.model.bits), np.float32), None
    for local in input_pipeline.eval_batches(self._config, source, local_batch_size=self._local_batch,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count()):
      batch = sharding.global_batch(self._mesh, local)
      out = self._encode(params, batch["image"])
      out, label, index, mask = multihost_utils.process_allgather(
          (out, batch["label"], batch["index"], batch["mask"]), tiled=True)
      if labels is None:
        labels = np.zeros((len(source), label.shape[1]), np.float32)
      codes[index[mask]] = out[mask]
      labels[index[mask]] = label[mask]
    return codes, labels

  def run(self, params, splits, step: int, workdir: str, history: dict,
          writer: metric_writer.MetricWriter | None = None) -> dict:
    """Evaluates `params`, writes `workdir/eval/`, and returns the updated results (final and best)."""
    t0 = time.perf_counter()
    q_codes, q_labels = self.encode(params, splits.query)
    db_codes, db_labels = self.encode(params, splits.database)
    t1 = time.perf_counter()
    # The database is sharded over the mesh's data axis: on a CPU host, one device per core.
    m = metrics.retrieval_metrics(q_codes, db_codes, q_labels, db_labels, top_k=splits.top_k, mesh=self._mesh)
    t2 = time.perf_counter()
    cfg = self._config
    final = dict(
        map=m["map"], map_tie_aware=m["map_tie_aware"], precision_at_radius_2=m["precision_at_radius_2"],
        top_k=splits.top_k, bits=cfg.model.bits, step=int(step), dataset=splits.name,
        num_query=len(q_codes), num_database=len(db_codes),
        timings=dict(encode_s=t1 - t0, metrics_s=t2 - t1))
    hist = [h for h in history.get("history", []) if h["step"] != step] + [dict(step=int(step), map=m["map"])]
    best = max(hist, key=lambda h: h["map"])
    results = dict(
        final, which="top-level fields are the final evaluation (the last step); 'best' is the best mAP over "
        "the evaluations during training, selected on the query set as the reference does",
        best=best, history=sorted(hist, key=lambda h: h["step"]))
    logging.info("eval step %d: mAP@%d %.4f (tie-aware %.4f), best %.4f at step %d; encode %.1fs, metrics %.2fs",
                 step, splits.top_k, m["map"], m["map_tie_aware"], best["map"], best["step"], t1 - t0, t2 - t1)
    if writer is not None:
      writer.write(step, {"eval_map": m["map"], "eval_map_tie_aware": m["map_tie_aware"]})
    if jax.process_index() == 0:
      self._write(workdir, results, m, splits, q_codes, db_codes, q_labels, db_labels)
    return results

  def _write(self, workdir, results, m, splits, q_codes, db_codes, q_labels, db_labels) -> None:
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pr_curve.json"), "w", encoding="utf-8") as f:
      json.dump({k: np.asarray(v).tolist() for k, v in m["pr_curve"].items()}, f)
    with open(os.path.join(out, "precision_at_n.json"), "w", encoding="utf-8") as f:
      json.dump({k: np.asarray(v).tolist() for k, v in m["precision_at_n"].items()}, f)
    plots.plot_pr_curve(m["pr_curve"], os.path.join(out, "pr_curve.png"))
    plots.plot_precision_at_n(m["precision_at_n"], os.path.join(out, "precision_at_n.png"))
    queries = np.arange(min(GRID_QUERIES, len(q_codes)))
    top = metrics.top_indices(q_codes[queries], db_codes, GRID_TOP)
    relevant = (q_labels[queries] @ db_labels.T > 0)[np.arange(len(queries))[:, None], top]
    plots.plot_retrieval_grid(input_pipeline.eval_images(self._config, splits.query, queries),
                              input_pipeline.eval_images(self._config, splits.database, top.reshape(-1)),
                              top, relevant, os.path.join(out, "retrieval_grid.png"))
    with open(_results_path(workdir), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores params from `workdir` (latest, or `config.eval_step`) onto the present devices and evaluates."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  r = encoding.restore(os.path.join(workdir, "checkpoints"), mesh, config.to_dict(), config.eval_step)
  splits = input_pipeline.build_splits(config, workdir)
  evaluator = Evaluator(config, r.model, mesh, r.params_shardings)
  return evaluator.run(r.params, splits, r.step, workdir, load_history(workdir))
