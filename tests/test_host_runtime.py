"""Readers set a saved config's runtime fields for their host: a checkpoint of a cuDNN run encodes on a CPU."""

import json
import os

import numpy as np
import pytest

from hybridhash_jax import demo
from hybridhash_jax import encoding
from hybridhash_jax import errors
from hybridhash_jax import export
from hybridhash_jax import exported
from hybridhash_jax import models
from tests import helpers

GPU_RUN = dict(attention="cudnn", dtype="bfloat16", remat="full")


def test_for_host_sets_only_runtime_fields():
  saved = models.model_config(models.hybridhash_tiny32())
  saved.update(GPU_RUN)
  cpu = models.for_host(saved, "cpu")
  assert (cpu["attention"], cpu["dtype"], cpu["remat"]) == ("xla", "float32", "none")
  assert models.for_host(saved, "gpu") == dict(saved, remat="none")  # cuDNN stays where it runs
  assert models.for_host(saved, "tpu") == dict(saved, attention="xla", remat="none")
  for host in (cpu, models.for_host(saved, "tpu")):
    assert {k: host[k] for k in models.ARCHITECTURE_FIELDS} == {k: saved[k] for k in models.ARCHITECTURE_FIELDS}
    models.from_config(host)  # builds here (a CPU): cudnn is gone
  assert models.for_host(dict(saved, attention="einsum"), "cpu")["attention"] == "einsum"


def _saved_config(workdir):
  with open(os.path.join(workdir, "checkpoints", "7", "config", "metadata")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
  """A tiny checkpoint whose saved config says cudnn, bfloat16 and remat, as a GPU run writes it."""
  workdir = str(tmp_path_factory.mktemp("gpu_run"))
  demo.write_random_checkpoint(workdir, helpers.tiny_config())
  config = _saved_config(workdir)
  config["model"].update(GPU_RUN)
  path = os.path.join(workdir, "checkpoints", "7", "config", "metadata")
  with open(path, "w") as f:
    json.dump(config, f)
  return workdir


def _reference_codes(workdir, images):
  """The same params through the float32 einsum model."""
  directory, mesh = os.path.join(workdir, "checkpoints"), encoding.local_mesh()
  config = _saved_config(workdir)
  config["model"].update(attention="einsum", dtype="float32", remat="none")
  r = encoding.restore(directory, mesh, config)
  return np.asarray(encoding.encode_fn(r.model, mesh, r.params_shardings)(r.params, images))


IMAGES = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)


def test_cudnn_checkpoint_encodes_on_cpu(gpu_checkpoint):
  saved = _saved_config(gpu_checkpoint)
  with pytest.raises(errors.ConfigError, match="cudnn"):  # what every reader did with it before
    models.from_config(saved["model"])
  enc = encoding.Encoder.from_workdir(gpu_checkpoint)  # index, serve and export open it so
  assert (enc.info["model"]["attention"], enc.info["model"]["dtype"]) == ("xla", "float32")
  codes = enc.encode(IMAGES)
  assert codes.shape == (4, 16) and np.isfinite(codes).all() and len(np.unique(codes >= 0, axis=0)) > 1


@pytest.mark.slow
def test_cudnn_checkpoint_encodes_as_the_float32_model(gpu_checkpoint):
  codes = encoding.Encoder.from_workdir(gpu_checkpoint).encode(IMAGES)
  np.testing.assert_allclose(codes, _reference_codes(gpu_checkpoint, IMAGES), atol=1e-5)


@pytest.mark.slow
def test_cudnn_checkpoint_exports_on_cpu(gpu_checkpoint, tmp_path):
  out = str(tmp_path / "encoder.npz")
  export.export_encoder(gpu_checkpoint, out, platforms=("cpu",))
  run, info = exported.load(out)
  assert info["model"]["attention"] == "xla"
  np.testing.assert_allclose(run(IMAGES), _reference_codes(gpu_checkpoint, IMAGES), atol=1e-5)
