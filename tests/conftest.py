"""Test setup: four simulated CPU devices, set before any JAX backend starts, one compilation cache, and the
session's shared artefacts: one tiny trained model, an index of its database, a random-weights search demo.

Most of the suite's time is XLA:CPU compiling the same tiny programs in many tests and their
subprocesses; a persistent cache, fresh for each run, holding programs of any compile time and
inherited by pytest-xdist's workers and the subprocesses through the environment, compiles each once.
It stores executables, so it changes no result. XLA:CPU compiles without LLVM's optimisations
(`--xla_backend_optimization_level=0`): the tests' programs are tiny, so they compile in half the time and run
as fast, within float32 rounding. The numba kernels are compiled at LLVM's level 1 (`NUMBA_OPT=1`; at 0 numba
cannot cache them) into their own fresh cache, shared the same way, so a checkout's cache never holds less
optimised kernels: integer code, the same results. The shared artefacts are read-only: a test that changes one
copies it first.
"""

import atexit
import dataclasses
import os
import pathlib
import shutil
import subprocess
import tempfile

os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0") if f)
os.environ["NUMBA_OPT"] = "1"
# The first pytest process of a run makes the caches and alone removes them; its xdist workers inherit them.
if "HYBRIDHASH_TEST_CACHES_OWNER" not in os.environ:
  os.environ["HYBRIDHASH_TEST_CACHES_OWNER"] = str(os.getpid())
  os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="hybridhash-numba-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hybridhash-jax-cache-")

from absl import flags
import jax
import numpy as np
import pytest

from tests import data_fixtures
from tests import helpers

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
if os.environ["HYBRIDHASH_TEST_CACHES_OWNER"] == str(os.getpid()):
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  atexit.register(shutil.rmtree, os.environ["NUMBA_CACHE_DIR"], ignore_errors=True)
flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags; pytest never parses them.

_MAX_WORKERS = 4  # each worker trains the session's shared model and holds 4 simulated devices of its own


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per usable core, at most `_MAX_WORKERS`."""
  del config
  return min(len(os.sched_getaffinity(0)), _MAX_WORKERS)


GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"  # the reference's outputs; see golden/README.md


@pytest.fixture(scope="session")
def golden_dir():
  return GOLDEN


@dataclasses.dataclass(frozen=True)
class Trained:
  workdir: pathlib.Path  # checkpoints/ at steps 4, 8 and 12, metrics.jsonl, eval/
  config: object  # the config it was trained with
  results: dict  # train_and_evaluate's return: the final evaluation

  def config_with(self, **overrides):
    return helpers.with_overrides(self.config, **overrides)

  def main(self, workdir, *overrides, devices=1, background=False):
    """`main` on `workdir` in a process of its own with this run's config and `overrides`: run to its end
    (a CompletedProcess), or started with stdout and stderr on pipes (a Popen). Its programs are compiled
    once per session and device count."""
    cmd = helpers.main_cmd(workdir, *[f"{k}={v}" for k, v in helpers.TRAINED.items()],
                           f"init_checkpoint={self.config.init_checkpoint}", *overrides)
    kwargs = dict(cwd=helpers.REPO, env=helpers.cli_env(devices), text=True)
    if background:
      return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    return subprocess.run(cmd, capture_output=True, timeout=600, **kwargs)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
  """The tiny config with `helpers.TRAINED`, trained for its 12 steps on the 4 test devices, once per session.

  It starts from random params scaled by fan-in (`demo.write_random_checkpoint`): flax's init of so small a
  model gives codes that hardly depend on the image, and a few steps then drive them all to one sign pattern.
  """
  from hybridhash_jax import demo
  from hybridhash_jax import train
  root = tmp_path_factory.mktemp("trained")
  demo.write_random_checkpoint(str(root / "init"), helpers.tiny_config(), step=0)
  config = helpers.tiny_config(init_checkpoint=str(root / "init" / "checkpoints"), **helpers.TRAINED)
  workdir = root / "work"
  results = train.train_and_evaluate(config, str(workdir))
  return Trained(workdir, config, results)


def _write_split(source, root) -> np.ndarray:
  """`root/<class>/<row>.png` for every row; returns the rows in the index's id order (sorted paths)."""
  names = []
  for i in range(len(source)):
    r = source[i]
    name = f"{int(np.argmax(r['label']))}/{i:05d}.png"
    data_fixtures.write_image(os.path.join(root, name), np.asarray(r["image"]))
    names.append(name)
  return np.asarray([int(n.split("/")[1][:5]) for n in sorted(names)])


@pytest.fixture(scope="session")
def indexed(trained, tmp_path_factory) -> dict:
  """`trained`'s evaluator codes, PNG folders of its query and database splits, and an index of the database."""
  from hybridhash_jax import encoding
  from hybridhash_jax import evaluate
  from hybridhash_jax import index_build
  from hybridhash_jax import input_pipeline
  from hybridhash_jax import metrics
  from hybridhash_jax import sharding
  root = tmp_path_factory.mktemp("indexed")
  config, workdir = trained.config, str(trained.workdir)
  splits = input_pipeline.build_splits(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  r = encoding.restore(os.path.join(workdir, "checkpoints"), mesh, config.to_dict())
  ev = evaluate.Evaluator(config, r.model, mesh, r.params_shardings)
  db_codes, db_labels = ev.encode(r.params, splits.database)[:2]
  q_codes, q_labels = ev.encode(r.params, splits.query)[:2]
  # The model must tell images apart, or a ranking test on its codes could not fail.
  _, counts = np.unique(metrics.pack_codes(db_codes), axis=0, return_counts=True)
  assert len(counts) >= 100 and counts.max() <= 0.25 * len(db_codes), (
      f"the shared model gives {len(counts)} codes for {len(db_codes)} images, {counts.max()} of them one code")
  order = _write_split(splits.database, root / "db")
  q_order = _write_split(splits.query, root / "queries")
  encoder = encoding.Encoder.from_workdir(workdir)
  info = index_build.build(encoder, str(root / "db"), str(root / "out"), progress=False)
  return dict(root=root, workdir=workdir, config=config, encoder=encoder, info=info, out=str(root / "out"),
              db_codes=db_codes, db_labels=db_labels, q_codes=q_codes, q_labels=q_labels, order=order,
              q_order=q_order)


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  """A tiny index with its encoder and a random checkpoint, shared by the web app's tests (which only read it)."""
  from hybridhash_jax import demo
  return demo.make(str(tmp_path_factory.mktemp("served")), helpers.tiny_config())
