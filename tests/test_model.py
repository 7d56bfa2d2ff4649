"""HybridHash model: golden parity with the PyTorch reference, quirks, shapes, precision."""

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridhash_jax import checkpoints, config_lib, convert, models
from hybridhash_jax.models import (
    HybridHash, from_config, hybridhash_paper, hybridhash_tiny32, hybridhash_tiny112, model_config)
from hybridhash_jax.models import hybridhash as hh
from hybridhash_jax.models import nest_blocks


@pytest.fixture(scope="module")
def golden(golden_dir):
  io = np.load(golden_dir / "tiny112_io.npz")
  params = convert.load_torch_weights(str(golden_dir / "tiny112_state_dict.safetensors"), hybridhash_tiny112())
  return params, io["x_nchw"].transpose(0, 2, 3, 1), io["codes"], io["features_nchw"].transpose(0, 2, 3, 1)


def _run(model, params, x):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))(params, x)


def test_golden_parity(golden):
  params, x, codes_ref, feats_ref = golden
  codes, feats = _run(hybridhash_tiny112(), params, x)
  d_codes, d_feats = np.abs(codes - codes_ref).max(), np.abs(feats - feats_ref).max()
  print(f"golden max abs diff: codes {d_codes:.2e}, features {d_feats:.2e}")
  assert codes.dtype == jnp.float32 and codes.shape == (3, 32) and feats.shape == (3, 14, 14, 64)
  assert d_codes <= 1e-4 and d_feats <= 1e-4


@pytest.mark.slow
def test_spatial_token_layout_changes_the_output(golden):
  params, x, codes_ref, _ = golden
  codes, _ = _run(hybridhash_tiny112(token_layout="spatial"), params, x)
  assert np.abs(codes - codes_ref).max() > 1e-3


@pytest.mark.parametrize("quirk", ["tanh_gelu", "tf_same_pool"])
@pytest.mark.slow
def test_each_quirk_matters(golden, monkeypatch, quirk):
  params, x, codes_ref, feats_ref = golden
  if quirk == "tanh_gelu":
    monkeypatch.setattr(nest_blocks.nn, "gelu", lambda y, approximate: jax.nn.gelu(y, approximate=True))
  else:
    monkeypatch.setattr(hh, "_max_pool", lambda y: nn.max_pool(y, (3, 3), strides=(2, 2), padding="SAME"))
  codes, feats = _run(hybridhash_tiny112(), params, x)
  assert max(np.abs(codes - codes_ref).max(), np.abs(feats - feats_ref).max()) > 1e-4


def test_bilinear_matches_pytorch_align_corners_false():
  # Hand-worked PyTorch values: source x = (dst + .5) / f - .5, clamped at 0, right edge clamped.
  np.testing.assert_allclose(hh._bilinear_matrix(2, 2) @ [0.0, 1.0], [0, 0.25, 0.75, 1])
  np.testing.assert_allclose(hh._bilinear_matrix(2, 3) @ [0.0, 1.0], [0, 0, 1 / 3, 2 / 3, 1, 1])
  np.testing.assert_allclose(hh._bilinear_matrix(1, 4), np.ones((4, 1)))
  x = np.arange(2 * 2 * 3 * 5, dtype=np.float32).reshape(2, 2, 3, 5)
  up = np.asarray(hh.upsample_bilinear(jnp.asarray(x), 2))
  np.testing.assert_allclose(up[1, 1, 0], 0.75 * x[1, 0, 0] + 0.25 * x[1, 1, 0], rtol=1e-6)
  # Separable: rows then columns, against the 1-D weights.
  rows, cols = hh._bilinear_matrix(2, 2), hh._bilinear_matrix(3, 2)
  np.testing.assert_allclose(up, np.einsum("oh,pw,bhwc->bopc", rows, cols, x), rtol=1e-6)


@pytest.mark.parametrize("bits, count", [(16, 55_561_616), (64, 55_586_240)])
def test_paper_parameter_count(bits, count):
  params = models.abstract_params(hybridhash_paper(bits))
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) == count


@pytest.mark.parametrize("kw, field", [
    (dict(img_size=30, patch_size=4), "img_size"),
    (dict(img_size=40, patch_size=4), "img_size / patch_size"),
    (dict(embed_dims=(16, 32, 64), num_heads=(3, 4, 8)), "num_heads[0]"),
    (dict(embed_dims=(16, 36, 64), num_heads=(2, 4, 8)), "embed_dims[1]"),
    (dict(embed_dims=(16, 32), num_heads=(2, 4, 8)), "embed_dims"),
    (dict(depths=(1, 1)), "depths"),
    (dict(bits=0), "bits"),
    (dict(token_layout="channels"), "token_layout"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
])
def test_invalid_shapes_name_the_field(kw, field):
  with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
    hybridhash_tiny32(**kw)


def test_global_width_check_follows_the_branches():
  hybridhash_tiny32(embed_dims=(16, 36, 64), num_heads=(2, 4, 8), interaction=False)  # no global attention at 36
  with pytest.raises(ValueError, match=r"embed_dims\[2\]"):
    hybridhash_tiny32(embed_dims=(16, 32, 68), num_heads=(2, 4, 4), interaction=False)


def test_from_config_and_model_config():
  cfg = config_lib.base_config().model
  model = from_config(cfg)
  assert model == hybridhash_paper(64)
  assert model_config(model) == {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()}
  assert from_config(model_config(model)) == model
  with pytest.raises(ValueError, match="widths"):
    from_config({**cfg.to_dict(), "widths": 3})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_jit_train_and_eval(dtype):
  model = hybridhash_tiny32(drop_path_rate=0.5, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  train = jax.jit(lambda p, x, k: model.apply({"params": p}, x, train=True, rngs={"dropout": k}))
  evaluate = jax.jit(lambda p, x: model.apply({"params": p}, x))
  a, b, c = (np.asarray(train(params, x, jax.random.key(k))) for k in (7, 7, 8))
  e = np.asarray(evaluate(params, x))
  assert e.dtype == np.float32 and a.dtype == np.float32 and e.shape == (4, 16)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-6 and np.abs(a - e).max() > 1e-6
  no_drop = hybridhash_tiny32(drop_path_rate=0.0, dtype=dtype)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda p, x: no_drop.apply({"params": p}, x, train=True))(params, x)), e)


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32(golden):
  params, x, codes_ref, feats_ref = golden
  codes, feats = _run(hybridhash_tiny112(dtype="bfloat16"), params, x)
  d_codes, d_feats = np.abs(codes - codes_ref).max(), np.abs(feats - feats_ref).max()
  print(f"bf16 vs reference max abs diff: codes {d_codes:.3e}, features {d_feats:.3e} "
        f"(features span {np.abs(feats_ref).max():.2f})")
  assert codes.dtype == jnp.float32 and feats.dtype == jnp.float32
  assert 1e-6 < d_codes < 0.02 and d_feats < 0.15


@pytest.mark.slow
def test_init_follows_the_reference():
  model = hybridhash_tiny112()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 112, 112, 3)))["params"]
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  big = [v for k, v in flat.items() if k.endswith("kernel") and v.size >= 4096]
  assert all(abs(v.std() - 0.02) < 0.002 and abs(v.mean()) < 0.002 for v in big) and len(big) > 10
  for k, v in flat.items():
    if k.endswith("bias") or k.endswith("pos_embed_glo"):
      assert not v.any(), k
    elif k.endswith("scale"):
      assert (v == 1).all(), k
    elif k.endswith("pos_embed"):
      assert abs(v.std() - 0.02) < 0.001, k


def test_default_module_is_the_paper_model():
  assert HybridHash() == hybridhash_paper(64)
  assert hybridhash_paper(64).block == 14 and hybridhash_tiny32().block == 4


def _tiny_with_grads(**switches):
  """Codes (train mode, drop path on) and parameter gradients of the tiny model with these switches."""
  model = hybridhash_tiny32(drop_path_rate=0.3, **switches)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = jax.jit(hybridhash_tiny32().init)(jax.random.key(0), x)["params"]

  def loss(p):
    codes = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)})
    return (codes * jnp.arange(codes.shape[1])).sum(), codes

  (_, codes), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert jax.tree.structure(models.abstract_params(model)) == jax.tree.structure(params)  # same param tree
  return np.asarray(codes), grads


@pytest.mark.slow
def test_xla_attention_equals_the_einsum_attention():
  codes, grads = _tiny_with_grads()
  xla_codes, xla_grads = _tiny_with_grads(attention="xla")
  np.testing.assert_allclose(xla_codes, codes, rtol=0, atol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-7), xla_grads, grads)


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.slow
def test_remat_keeps_outputs_and_gradients(remat):
  codes, grads = _tiny_with_grads()
  r_codes, r_grads = _tiny_with_grads(remat=remat)
  np.testing.assert_allclose(r_codes, codes, rtol=0, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-7), r_grads, grads)


def test_bad_attention_and_remat_name_the_field():
  with pytest.raises(ValueError, match="attention = 'cudnn' needs a GPU"):
    hybridhash_tiny32(attention="cudnn", dtype="bfloat16")  # the tests run on CPU
  with pytest.raises(ValueError, match="attention"):
    hybridhash_tiny32(attention="flash")
  with pytest.raises(ValueError, match="remat"):
    hybridhash_tiny32(remat="all")


def test_attention_and_remat_are_not_checked_model_fields():
  # They change no output, so a checkpoint written with one setting restores under another.
  saved = config_lib.base_config().to_dict()
  config = config_lib.base_config()
  config.model.attention, config.model.remat = "xla", "full"
  checkpoints.check_compatible(saved, config.to_dict(), "here", checkpoints.RESUME_FIELDS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 7, 7, 3), *(pytest.param(s, marks=pytest.mark.slow)
                                                   for s in [(1, 8, 6, 2), (1, 1, 1, 1), (1, 2, 3, 1)])])
def test_max_pool_and_its_gradient_equal_reduce_window(shape, dtype):
  # Many ties (values in {0, 1, 2}); integer cotangents make every sum exact, so routing is compared exactly.
  ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 3, shape), dtype)
  g = jnp.asarray(rng.integers(-8, 9, ref(x).shape), dtype)
  np.testing.assert_array_equal(hh._max_pool(x), ref(x))
  np.testing.assert_array_equal(jax.vjp(hh._max_pool, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0])
