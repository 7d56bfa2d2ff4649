"""Test setup: four simulated CPU devices, set before any JAX backend starts, and one compilation cache.

Most of the suite's time is XLA:CPU compiling the same tiny programs in many tests and their
subprocesses; a persistent cache, fresh for each session and inherited by the subprocesses through
the environment, compiles each once. It stores executables, so it changes no result.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

from absl import flags
import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hybridhash-jax-cache-")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags; pytest never parses them.

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"  # the reference's outputs; see golden/README.md


@pytest.fixture(scope="session")
def golden_dir():
  return GOLDEN


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  """A tiny index with its encoder and checkpoint, shared by the web app's tests (which only read it)."""
  from tests import serve_fixtures
  return serve_fixtures.make(str(tmp_path_factory.mktemp("served")))
