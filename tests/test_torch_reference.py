"""experiments/torch_reference.py against the reference's goldens; torch only, no JAX.

In a torch-only environment run it without the suite's JAX conftest:
  python -m pytest tests/test_torch_reference.py -q --noconftest
"""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
TINY112 = dict(img_size=112, patch_size=2, embed_dims=(16, 32, 64), num_heads=(2, 4, 8), depths=(1, 1, 2),
               bits=32)


def _load_module():
  """By path: experiments/ is not a package."""
  spec = importlib.util.spec_from_file_location("torch_reference", REPO / "experiments" / "torch_reference.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


tr = _load_module()


def test_golden_state_dict_loads_strict_and_outputs_match():
  model = tr.HybridHash(**TINY112)
  state = safetensors_torch.load_file(str(GOLDEN / "tiny112_state_dict.safetensors"))
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
  model.load_state_dict(state, strict=True)
  io = np.load(GOLDEN / "tiny112_io.npz")
  with torch.no_grad():
    codes, features = model.eval()(torch.from_numpy(io["x_nchw"]), return_features=True)
  np.testing.assert_allclose(codes.numpy(), io["codes"], rtol=0, atol=2e-5)
  np.testing.assert_allclose(features.numpy(), io["features_nchw"], rtol=0, atol=2e-5)


def test_wmle_loss_matches_reference_sequence():
  g = np.load(GOLDEN / "wmle_loss_sequence.npz")
  bank = tr.MemoryBank(int(g["bank_size"]), g["u"].shape[-1], g["y"].shape[-1])
  got = []
  for u, y, index in zip(g["u"], g["y"], g["ind"]):
    u, y, index = torch.from_numpy(u), torch.from_numpy(y), torch.from_numpy(index)
    bank.update(u, y, index)
    got.append(float(tr.wmle_loss(u, y, bank.U, bank.Y, float(g["alpha"]))))
  np.testing.assert_allclose(got, g["loss"], rtol=0, atol=1e-5)


def test_measure_runs_a_tiny_train_step():
  out = tr.measure(img_size=32, patch_size=2, embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=(2, 4, 8),
                   bits=16, batch_size=4, steps=1, warmup=1, threads=1, train_size=64)
  assert out["images_per_s"] > 0 and len(out["step_s"]) == 1 and out["threads"] == 1
  assert out["torch_version"] == torch.__version__ and np.isfinite(out["loss"]).all()
