"""experiments/lower_check.py lowers the accelerator programs for cuda and tpu on a CPU and reads what they hold."""

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from experiments import lower_check
from tests.helpers import TINY, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
PLATFORMS = ("cuda", "tpu")
# The least model to compile: one 8 px level; its params of 64 elements or more are split under FSDP.
ONE_LEVEL = {"model.img_size": 8, "model.embed_dims": (8,), "model.num_heads": (1,), "model.depths": (1,),
             "mesh.fsdp_min_size": 64}


def test_encoder_and_ranking_kernel_lower_for_cuda_and_tpu():
  table = lower_check.check(tiny_config(**ONE_LEVEL), PLATFORMS, ("encode", "ranking_sort"), queries=20, database=300)
  for p in PLATFORMS:
    enc, rank = table[p]["encode"], table[p]["ranking_sort"]
    assert enc["status"] == rank["status"] == "ok", table
    for row in (enc, rank):
      assert row["module_bytes"] > 0 and row["host_callbacks"] == row["float64_values"] == 0 and not row["warnings"]
    assert sum(enc["collectives"].values()) == 0  # the batch split, the params on every device: nothing to exchange
    # The database split over the mesh: the shards' histograms gathered, the per-query sums reduced.
    assert rank["collectives"]["all-gather"] >= 1 and rank["collectives"]["all-reduce"] >= 1


def test_host_callback_unusable_donation_and_float64_are_reported(monkeypatch):
  x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
  # A host callback, and a donated input no output can take.
  fn = jax.jit(lambda a, b: (jax.pure_callback(lambda v: v * 2, x, a), b.sum()), donate_argnums=(0, 1))
  monkeypatch.setattr(lower_check, "programs", lambda *args: {"callback": lambda: (fn, (x, x), {}, None)})
  table = lower_check.check(None, ("cpu", "tpu"))
  cpu = table["cpu"]["callback"]
  assert cpu["status"] == "ok" and cpu["host_callbacks"] == 1 and cpu["donated_aliased"] == 1
  assert any("donated buffers were not usable" in w for w in cpu["warnings"])
  assert "tpu" in table["tpu"]["callback"]["status"]  # a CPU callback does not lower for a TPU
  with jax.enable_x64(True):
    text = jax.jit(lambda a: a.astype(jnp.float64).sum()).trace(x).lower(lowering_platforms=("tpu",)).as_text()
  assert lower_check.scan_lowered(text)["float64_values"] > 0


def test_partitioned_collectives_count_combined_ones_once_with_their_bytes():
  hlo = """
  %all-reduce.1 = (f32[8]{0}, bf16[16,8]{1,0}) all-reduce(%a, %b), channel_id=1, to_apply=%add
  %all-gather = f32[2,2,3,8]{2,1,0,3} all-gather(%p), dimensions={0}
  %all-reduce.2 = pred[] all-reduce(%q), to_apply=%and
  %all-gather-start = s32[8,1]{1,0} all-gather-start(%q), dimensions={0}
  %reduce-scatter = f32[4]{0} reduce-scatter(%g), dimensions={0}
  %dot = f32[2,2,3,8]{3,2,1,0} dot(%p, %q)"""
  compiled = types.SimpleNamespace(as_text=lambda: hlo, memory_analysis=lambda: None)
  got = lower_check.scan_partitioned(compiled, {"w": jax.ShapeDtypeStruct((2, 2, 3, 8), jnp.float32)})
  assert got == {"collectives": {"all-reduce": 2, "all-gather": 2, "reduce-scatter": 1, "all-to-all": 0,
                                 "collective-permute": 0},
                 "collective_bytes": {"all-reduce": 8 * 4 + 16 * 8 * 2 + 1, "all-gather": 96 * 4 + 8 * 4,
                                      "reduce-scatter": 16, "all-to-all": 0, "collective-permute": 0},
                 "param_all_gathers": 1}


@pytest.mark.slow
def test_cli_fsdp_gathers_params_and_data_parallel_does_not():
  overrides = [f"--config.{k}={v}" for k, v in ONE_LEVEL.items()]
  out = subprocess.run([sys.executable, "-m", "experiments.lower_check", f"--config={TINY}", "--devices=4",
                        "--queries=20", "--database=300", "--train_size=40", *overrides], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900,
                       check=True).stdout
  (line,) = out.strip().splitlines()
  table = json.loads(line)
  assert set(table) == set(PLATFORMS)
  for p in PLATFORMS:
    assert tuple(table[p]) == lower_check.PROGRAMS and all(r["status"] == "ok" for r in table[p].values()), table[p]
    dp, fsdp = table[p]["train_step"], table[p]["train_step_fsdp"]
    for row in (dp, fsdp):  # the whole state donated and aliased, nothing on the host
      assert row["donated_aliased"] > row["param_leaves"] and row["donated_unaliased"] == 0 and not row["warnings"]
      assert row["host_callbacks"] == row["float64_values"] == 0
    assert dp["param_leaves_sharded"] == dp["param_all_gathers"] == 0
    assert dp["param_bytes_per_device"] == dp["param_bytes"]
    assert dp["collective_bytes"]["all-reduce"] >= dp["param_bytes"]  # every gradient, reduced in float32
    assert 0 < fsdp["param_leaves_sharded"] <= fsdp["param_all_gathers"]
    assert fsdp["param_bytes_per_device"] < dp["param_bytes_per_device"]
    assert fsdp["argument_bytes_per_device"] < dp["argument_bytes_per_device"]
    assert fsdp["collective_bytes"]["all-gather"] > dp["collective_bytes"]["all-gather"]
