"""Evaluation: encode the query and database sets, rank by Hamming distance, write the results.

Every example is encoded (padded batches with a mask, never a dropped remainder), codes
are put back in source order, and `workdir/eval/` receives `results.json` (final and
best mAP, each named as such), the PR curve and precision@N as JSON and PNG, and a PNG
grid of the top 10 results of a few queries.
"""

import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from hybridhash_jax import config_lib
from hybridhash_jax import encoding
from hybridhash_jax import files
from hybridhash_jax import input_pipeline
from hybridhash_jax import metric_writer
from hybridhash_jax import metrics
from hybridhash_jax import plots
from hybridhash_jax import sharding

GRID_QUERIES = 5
GRID_TOP = 10


def _results_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "eval" / "results.json"


def load_history(workdir: str) -> dict:
  """Earlier evaluations of this run (after a resume), so `best` spans the whole run."""
  path = _results_path(workdir)
  return files.read_json(path) if path.exists() else {}


class Evaluator:
  """Encodes with a jitted, batch-sharded forward pass and computes the retrieval metrics."""

  def __init__(self, config: ml_collections.ConfigDict, model, mesh, params_shardings):
    self._config = config
    self._mesh = mesh
    self._local_batch = sharding.local_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    self._encode = encoding.encode_fn(model, mesh, params_shardings)

  def encode(self, params, source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (tanh outputs), labels and `valid` of every example of `source`, in source order.

    `valid` is False on skipped images (on_bad_image="skip"), whose codes and labels stay zero.
    """
    codes, labels = np.zeros((len(source), self._config.model.bits), np.float32), None
    valid = np.zeros(len(source), bool)
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
      valid[index[mask]] = True
    return codes, labels, valid

  def run(self, params, splits, step: int, workdir: str, history: dict,
          writer: metric_writer.MetricWriter | None = None) -> dict:
    """Evaluates `params`, writes `workdir/eval/`, and returns the updated results (final and best)."""
    t0 = time.perf_counter()
    # Skipped images leave both sets before ranking; `*_rows` map what is left back to source rows.
    q_codes, q_labels, q_valid = self.encode(params, splits.query)
    db_codes, db_labels, db_valid = self.encode(params, splits.database)
    q_rows, db_rows = np.flatnonzero(q_valid), np.flatnonzero(db_valid)
    q_codes, q_labels, db_codes, db_labels = q_codes[q_rows], q_labels[q_rows], db_codes[db_rows], db_labels[db_rows]
    top_k = min(splits.top_k, len(db_rows))  # K = all (-1) is all that is left
    t1 = time.perf_counter()
    # The database is sharded over the mesh's data axis: on a CPU host, one device per core.
    m = metrics.retrieval_metrics(q_codes, db_codes, q_labels, db_labels, top_k=top_k, mesh=self._mesh)
    t2 = time.perf_counter()
    cfg = self._config
    final = dict(
        map=m["map"], map_tie_aware=m["map_tie_aware"], precision_at_radius_2=m["precision_at_radius_2"],
        top_k=top_k, bits=cfg.model.bits, step=int(step), dataset=splits.name,
        num_query=len(q_codes), num_database=len(db_codes),
        num_query_skipped=len(q_valid) - len(q_rows), num_database_skipped=len(db_valid) - len(db_rows),
        timings=dict(encode_s=t1 - t0, metrics_s=t2 - t1))
    hist = [h for h in history.get("history", []) if h["step"] != step] + [dict(step=int(step), map=m["map"])]
    best = max(hist, key=lambda h: h["map"])
    results = dict(
        final, which="top-level fields are the final evaluation (the last step); 'best' is the best mAP over "
        "the evaluations during training, selected on the query set as the reference does",
        best=best, history=sorted(hist, key=lambda h: h["step"]))
    logging.info("eval step %d: mAP@%d %.4f (tie-aware %.4f), best %.4f at step %d; encode %.1fs, metrics %.2fs",
                 step, top_k, m["map"], m["map_tie_aware"], best["map"], best["step"], t1 - t0, t2 - t1)
    if writer is not None:
      writer.write(step, {"eval_map": m["map"], "eval_map_tie_aware": m["map_tie_aware"]})
    if jax.process_index() == 0:
      self._write(workdir, results, m, splits, q_codes, db_codes, q_labels, db_labels, q_rows, db_rows)
    return results

  def _write(self, workdir, results, m, splits, q_codes, db_codes, q_labels, db_labels, q_rows, db_rows) -> None:
    out = epath.Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / "pr_curve.json", {k: np.asarray(v).tolist() for k, v in m["pr_curve"].items()})
    files.write_json(out / "precision_at_n.json", {k: np.asarray(v).tolist() for k, v in m["precision_at_n"].items()})
    plots.plot_pr_curve(m["pr_curve"], out / "pr_curve.png")
    plots.plot_precision_at_n(m["precision_at_n"], out / "precision_at_n.png")
    queries = np.arange(min(GRID_QUERIES, len(q_codes)))
    top = metrics.top_indices(q_codes[queries], db_codes, GRID_TOP)
    relevant = (q_labels[queries] @ db_labels.T > 0)[np.arange(len(queries))[:, None], top]
    plots.plot_retrieval_grid(input_pipeline.eval_images(self._config, splits.query, q_rows[queries]),
                              input_pipeline.eval_images(self._config, splits.database, db_rows[top.reshape(-1)]),
                              top, relevant, out / "retrieval_grid.png")
    files.write_json(_results_path(workdir), results, indent=2)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores params from `workdir` (latest, or `config.eval_step`) onto the present devices and evaluates."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  r = encoding.restore(str(epath.Path(workdir) / "checkpoints"), mesh, config.to_dict(), config.eval_step)
  splits = input_pipeline.build_splits(config, workdir)
  evaluator = Evaluator(config, r.model, mesh, r.params_shardings)
  return evaluator.run(r.params, splits, r.step, workdir, load_history(workdir))
