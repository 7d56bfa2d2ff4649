"""Checkpoint writing on one host: each replicated array is written from one device, and reads back whole."""

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridhash_jax import checkpoints


def test_replicated_arrays_are_written_without_slicing_them_per_replica(tmp_path, monkeypatch):
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  params = {"w": jax.device_put(np.arange(24, dtype=np.float32).reshape(4, 6), NamedSharding(mesh, P())),
            "b": jax.device_put(np.ones(5, np.float32), NamedSharding(mesh, P()))}
  slices = []
  slice_in_dim = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: slices.append(a[0].shape) or slice_in_dim(*a, **k))
  checkpoints.save_params(str(tmp_path), params, {"model": {}})
  assert slices == []  # replica-parallel writing slices each array into one piece per device first
  restored = checkpoints.restore(str(tmp_path), lambda saved: {"params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)}, fields=())
  for k, v in params.items():
    np.testing.assert_array_equal(restored.items["params"][k], v)


def test_choosing_the_writer_logs_no_override_notice(tmp_path, caplog):
  caplog.set_level("WARNING")
  checkpoints.manager(str(tmp_path), keep=1).close()
  checkpoints.save_params(str(tmp_path / "params"), {"b": np.ones(2, np.float32)}, {"model": {}})
  assert not [r for r in caplog.records if "overriding" in r.getMessage()], caplog.text
