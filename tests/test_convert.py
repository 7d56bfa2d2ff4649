"""Weight import: golden state dict, strict errors, NesT-B import, official NesT Flax tree, CLI."""

import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util
from safetensors.numpy import load_file, save_file

from hybridhash_jax import checkpoints, convert, models
from hybridhash_jax.models import hybridhash_paper, hybridhash_tiny32, hybridhash_tiny112, model_config
from hybridhash_jax.models.nest_blocks import Attention
from tests import fixtures_nest

# Small widths, the real NesT-B structure: NesT has depths (2, 2, 20), the model (2, 2, 15).
NEST_KW = dict(img_size=32, patch_size=2, embed_dims=(8, 16, 32), mlp_ratio=4)
NEST_HEADS, NEST_DEPTHS, MODEL_DEPTHS = (1, 2, 4), (2, 2, 20), (2, 2, 15)


def _equal_trees(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.fixture(scope="module")
def golden_sd(golden_dir):
  return str(golden_dir / "tiny112_state_dict.safetensors")


def test_golden_round_trip_is_exact(golden_sd, tmp_path):
  model = hybridhash_tiny112()
  params = convert.load_torch_weights(golden_sd, model)
  sd = load_file(golden_sd)
  back = convert.to_torch_state_dict(params, model)
  assert set(back) == {k for k in sd if not k.startswith("FcLayer.")}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  save_file(back, str(tmp_path / "back.safetensors"))
  _equal_trees(convert.load_torch_weights(str(tmp_path / "back.safetensors"), model), params)


def test_strict_lists_missing_unexpected_and_misshaped(golden_sd):
  sd = load_file(golden_sd)
  del sd["levels.1.pool.conv_glo.weight"]
  sd["levels.0.extra.weight"] = np.zeros(3, np.float32)
  sd["norm.bias"] = np.zeros(65, np.float32)
  with pytest.raises(ValueError) as e:
    convert.import_state_dict(sd, hybridhash_tiny112())
  msg = str(e.value)
  for part in ("missing (1)", "levels.1.pool.conv_glo.weight", "unexpected (1)", "levels.0.extra.weight",
               "mis-shaped (1)", "norm.bias: file has (65,), model wants (64,)"):
    assert part in msg


def test_pth_is_refused_with_the_recipe(tmp_path):
  with pytest.raises(ValueError, match=r"w\.pth.*docstring"):
    convert.load_torch_weights(str(tmp_path / "w.pth"), hybridhash_tiny112())


def _expected_nest_loaded(depths):
  """The reference's count: patch embed 2, pos embeds L, 12 per shared layer, pool conv+norm 4 per
  interaction, final norm 2."""
  levels = len(depths)
  return 2 + levels + 12 * sum(min(m, n) for m, n in zip(depths, NEST_DEPTHS)) + 4 * (levels - 1) + 2


def test_nest_b_count_at_real_sizes():
  model_names = {convert.torch_name(p): a.shape
                 for p, a in traverse_util.flatten_dict(models.abstract_params(hybridhash_paper(64))).items()}
  nest = fixtures_nest.nest_shapes(224, 4, (128, 256, 512), NEST_DEPTHS)
  shared = set(model_names) & set(nest)
  assert len(shared) == _expected_nest_loaded(MODEL_DEPTHS) == 243


@pytest.fixture(scope="module")
def nest_setup():
  model = hybridhash_tiny32(embed_dims=NEST_KW["embed_dims"], num_heads=NEST_HEADS, depths=MODEL_DEPTHS)
  sd = fixtures_nest.nest_state_dict(3, depths=NEST_DEPTHS, num_classes=10, **NEST_KW)
  init = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return model, sd, init


@pytest.mark.slow
def test_nest_import_loads_exactly_the_shared_tensors(nest_setup, caplog):
  model, sd, init = nest_setup
  params, report = convert.import_state_dict(sd, model, "nest", init)
  assert len(report.loaded) == _expected_nest_loaded(MODEL_DEPTHS) == 243
  deep = {f"levels.2.transformer_encoder.{j}." for j in range(15, 20)}
  assert set(report.skipped) == {k for k in sd if k[:len("levels.2.transformer_encoder.15.")] in deep
                                 or k.startswith("head.")}
  assert len(report.skipped) == 5 * 12 + 2
  hybrid_only = ("conv_glo", "global_attention", "hashlayer_train")
  assert all(any(h in k for h in hybrid_only) for k in report.kept_init) and len(report.kept_init) == 20
  got = convert.to_torch_state_dict(params, model)
  initial = convert.to_torch_state_dict(init, model)
  for k in report.loaded:
    np.testing.assert_array_equal(got[k], sd[k], err_msg=k)
  for k in report.kept_init:
    np.testing.assert_array_equal(got[k], initial[k], err_msg=k)
  assert set(report.loaded) | set(report.kept_init) == set(got)
  with caplog.at_level(logging.INFO):
    report.log()
  assert "levels.2.transformer_encoder.19.mlp.fc2.bias" in caplog.text and "head.weight" in caplog.text
  assert "hashlayer_train.conv2.weight" in caplog.text


@pytest.mark.slow
def test_nest_import_needs_init_and_matching_widths(nest_setup):
  model, sd, init = nest_setup
  with pytest.raises(ValueError, match="init_params"):
    convert.import_state_dict(sd, model, "nest")
  with pytest.raises(ValueError, match=r"(?s)mis-shaped \(243\).*and 218 more"):
    convert.import_state_dict(sd, hybridhash_tiny32(depths=MODEL_DEPTHS), "nest", init)


@pytest.mark.slow
def test_nest_params_round_trip_strict(nest_setup, tmp_path):
  model, sd, init = nest_setup
  params, _ = convert.import_state_dict(sd, model, "nest", init)
  path = str(tmp_path / "p.safetensors")
  save_file(convert.to_torch_state_dict(params, model), path)
  _equal_trees(convert.load_torch_weights(path, model, "strict"), params)


@pytest.mark.slow
def test_official_nest_flax_checkpoint(nest_setup, tmp_path):
  model, sd, init = nest_setup
  tree = fixtures_nest.state_dict_to_nest_flax(sd, NEST_HEADS, NEST_DEPTHS)
  path = tmp_path / "nest.msgpack"
  path.write_bytes(serialization.msgpack_serialize({"optimizer": {"target": tree}}))
  from_flax = convert.load_nest_flax_checkpoint(str(path), model, init)
  from_torch, _ = convert.import_state_dict(sd, model, "nest", init)
  _equal_trees(from_flax, from_torch)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  run = jax.jit(lambda p: model.apply({"params": p}, x))
  np.testing.assert_array_equal(np.asarray(run(from_flax)), np.asarray(run(from_torch)))


@pytest.mark.slow
def test_official_attention_math_matches_ours(nest_setup):
  """The official MultiHeadAttention, re-derived in NumPy from its Flax leaves, equals our
  Attention with the converted qkv/proj: this pins the head split and head-minor merge."""
  _, sd, _ = nest_setup
  tree = fixtures_nest.state_dict_to_nest_flax(sd, NEST_HEADS, NEST_DEPTHS)
  mha = tree["EncoderNDBlock_20"]["MultiHeadAttention_0"]  # a level-2 layer: 4 heads of 8
  x = np.random.default_rng(0).normal(size=(2, 1, 16, 32)).astype(np.float64)
  q = np.einsum("btnc,chd->bthnd", x, mha["DenseGeneral_0"]["kernel"]) + mha["DenseGeneral_0"]["bias"][:, None]
  kv = np.einsum("btnc,chd->bthnd", x, mha["DenseGeneral_1"]["kernel"]) + mha["DenseGeneral_1"]["bias"][:, None]
  k, v = np.split(kv, 2, axis=-1)
  logits = np.einsum("bthld,bthmd->bthlm", q / np.sqrt(q.shape[-1]), k)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.einsum("bthld,hdf->btlf", np.einsum("bthlm,bthmd->bthld", w, v), mha["proj_kernel"]) + mha["bias"]
  got_sd = convert.nest_flax_to_state_dict(tree)
  p = "levels.2.transformer_encoder.16.attn."
  params = {"qkv": {"kernel": got_sd[p + "qkv.weight"].T, "bias": got_sd[p + "qkv.bias"]},
            "proj": {"kernel": got_sd[p + "proj.weight"].T, "bias": got_sd[p + "proj.bias"]}}
  ours = Attention(num_heads=4).apply({"params": params}, x.astype(np.float32))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


@pytest.mark.slow
def test_convert_cli_writes_a_checkpoint(golden_sd, tmp_path):
  out = tmp_path / "ckpt"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  subprocess.run([sys.executable, "-m", "hybridhash_jax.convert", f"--source={golden_sd}", "--format=torch",
                  "--mode=strict", "--preset=tiny112", f"--output={out}"], check=True, env=env,
                 capture_output=True, text=True)
  model = hybridhash_tiny112()
  restored, saved_config, step = checkpoints.restore_params(str(out), models.abstract_params(model),
                                                            {"model": model_config(model)})
  assert step == 0 and saved_config["model"] == model_config(model)
  _equal_trees(restored, convert.load_torch_weights(golden_sd, model))
