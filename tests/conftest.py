"""Test setup: four simulated CPU devices, set before any JAX backend starts."""

import pathlib

from absl import flags
import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")
flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags; pytest never parses them.

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"  # the reference's outputs; see golden/README.md


@pytest.fixture(scope="session")
def golden_dir():
  return GOLDEN


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  """A tiny index with its encoder and checkpoint, shared by the web app's tests (which only read it)."""
  from tests import serve_fixtures  # pylint: disable=g-import-not-at-top
  return serve_fixtures.make(str(tmp_path_factory.mktemp("served")))
