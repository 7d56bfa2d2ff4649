"""The train loop: sharding invariance, two processes, kill and resume, wrong checkpoints, NaN."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hybridhash_jax import checkpoints
from hybridhash_jax import demo
from hybridhash_jax import evaluate
from hybridhash_jax import input_pipeline
from hybridhash_jax import losses
from hybridhash_jax import models
from hybridhash_jax import sharding
from hybridhash_jax import train
from tests import data_fixtures
from tests.helpers import REPO, TINY, cli_env, logged_losses, main_cmd, restore_state, tiny_config

@pytest.mark.slow
def test_one_step_on_four_devices_equals_one_device(tmp_path):
  config = tiny_config()
  splits = input_pipeline.build_splits(config, str(tmp_path))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
           "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)],
           "index": rng.permutation(len(splits.train))[:8].astype(np.int32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = jax.make_mesh((len(devices), 1), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
    setup = train.build(config, splits, mesh)
    step = train.make_train_step(setup, config)
    state = train.initial_state(setup, config)
    for _ in range(2):
      state, m = step(state, sharding.global_batch(mesh, batch))
      jax.block_until_ready(m)
    results.append((float(m["loss"]), jax.device_get(state.params), jax.device_get(state.bank_u)))
  (loss1, p1, b1), (loss4, p4, b4) = results
  assert abs(loss1 - loss4) <= 1e-5
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(b1, b4, atol=1e-5)
  assert np.abs(b1).sum() > 0  # the bank was written


@pytest.mark.slow
def test_fast_compiled_init_equals_the_default_compile(tmp_path, monkeypatch):
  """The init is compiled at a lower LLVM level on CPU for speed; its params, optimiser state, bank and
  rng are the default compile's, bit for bit (a one-level model keeps the default compile short)."""
  config = tiny_config(**{"model.depths": (1,), "model.embed_dims": (8,), "model.num_heads": (1,)})
  splits = input_pipeline.build_splits(config, str(tmp_path))
  setup = train.build(config, splits, sharding.make_mesh(config.mesh))
  fast = jax.device_get(train.initial_state(setup, config))
  # XLA's default level, named: the tests' own XLA_FLAGS lower the level of every other compile.
  monkeypatch.setattr(train, "CPU_INIT_COMPILER_OPTIONS", {"xla_backend_optimization_level": 3})
  default = jax.device_get(train.initial_state(setup, config))
  leaves = jax.tree.leaves(default)
  assert len(leaves) > 20 and sum(np.abs(x).sum() > 0 for x in leaves) > 10
  for a, b in zip(jax.tree.leaves(fast), leaves):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_fsdp_sharding_matches_replicated(tmp_path):
  """With a threshold the tiny model's larger leaves pass, FSDP really splits params and optimiser state,
  and a few steps give the losses and params of the replicated run."""
  config = tiny_config(**{"mesh.fsdp_min_size": 256})
  splits = input_pipeline.build_splits(config, str(tmp_path))
  loader = input_pipeline.train_loader(config, splits, seed=0, local_batch_size=8, worker_count=0)
  batches = [b for b, _ in zip(loader, range(3))]
  results = []
  for shape in ((4, 1), (2, 2)):
    mesh = jax.make_mesh(shape, ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:4])
    setup = train.build(config, splits, mesh)
    state = train.initial_state(setup, config)
    split = [x for x in jax.tree.leaves((state.params, state.opt_state))
             if x.addressable_shards[0].data.shape != x.shape]
    if shape[1] > 1:  # some params and their RMSprop accumulators are split in two over the fsdp axis
      assert len(split) >= 8 and all("fsdp" in x.sharding.spec for x in split)
      assert sum(x.size for x in split) > 0.5 * sum(x.size for x in jax.tree.leaves(state.params)) * 2
    else:
      assert not split
    step = train.make_train_step(setup, config)
    got = []
    for batch in batches:
      state, m = step(state, sharding.global_batch(mesh, batch))
      got.append(float(m["loss"]))
    results.append((got, jax.device_get(state.params)))
  (loss_rep, p_rep), (loss_fsdp, p_fsdp) = results
  np.testing.assert_allclose(loss_rep, loss_fsdp, atol=1e-5)
  for a, b in zip(jax.tree.leaves(p_rep), jax.tree.leaves(p_fsdp)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  # A small step size: RMSprop's first updates are ~lr * sign(g), so a gradient that is rounding
  # noise (different all-reduce orders) would otherwise move the loss by ~lr.
  steps, lr = "num_train_steps=4", "optimizer.learning_rate=1e-5"
  port = demo.free_port()
  cmd = [*main_cmd(tmp_path / "multi", steps, lr), f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2"]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=cli_env(1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  single = tmp_path / "single"  # one process, in this one, while the two run
  train.train_and_evaluate(tiny_config(num_train_steps=4, **{"optimizer.learning_rate": 1e-5}), str(single))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n\n".join(outs)
  one, two = logged_losses(single), logged_losses(tmp_path / "multi")
  assert sorted(one) == sorted(two) == [1, 2, 3, 4]
  for s in one:
    assert abs(one[s] - two[s]) <= 1e-5, (s, one[s], two[s])


@pytest.mark.slow
def test_kill_and_resume_is_exact(trained, tmp_path):
  """A run killed (SIGKILL) after a checkpoint resumes to the bits of an uninterrupted run. Only the killed run
  needs a process of its own; it has this process's 4 devices and the session's trained config, so all three
  runs use the programs compiled once for the session."""
  killed, clean = tmp_path / "killed", tmp_path / "clean"
  proc = trained.main(killed, "num_train_steps=100000", devices=4, background=True)
  ckpt_dir = killed / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
    if done:
      break
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with ocp.CheckpointManager(str(ckpt_dir)) as mngr:
    last = mngr.latest_step()
  assert last is not None and last % 4 == 0
  total = last + 8
  train.train_and_evaluate(trained.config_with(num_train_steps=total), str(killed))
  train.train_and_evaluate(trained.config_with(num_train_steps=total), str(clean))
  step_k, params_k, train_k = restore_state(killed)
  step_c, params_c, train_c = restore_state(clean)
  assert step_k == step_c == total
  for a, b in zip(jax.tree.leaves((params_k, train_k)), jax.tree.leaves((params_c, train_c))):
    np.testing.assert_array_equal(a, b)
  # The resumed run logged the same losses as the uninterrupted one after the restart.
  lk, lc = logged_losses(killed), logged_losses(clean)
  assert all(lk[s] == lc[s] for s in range(last + 1, total + 1))


def _copy(trained, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(trained.workdir, workdir)
  return workdir


def test_wrong_checkpoint_is_refused_naming_the_field(trained, tmp_path):
  workdir = str(_copy(trained, tmp_path))
  with pytest.raises(ValueError, match=r"model\.bits: checkpoint has 16, config has 32"):
    train.train_and_evaluate(trained.config_with(num_train_steps=16, **{"model.bits": 32}), workdir)
  with pytest.raises(ValueError, match=r"model\.embed_dims"):
    train.train_and_evaluate(trained.config_with(num_train_steps=16, **{"model.embed_dims": (8, 16, 24)}), workdir)
  with pytest.raises(ValueError, match=r"model\.bits"):
    evaluate.evaluate_checkpoint(trained.config_with(**{"model.bits": 32}), workdir)
  with pytest.raises(ValueError, match=r"model\.token_layout"):  # no parameter of its own, yet other outputs
    evaluate.evaluate_checkpoint(trained.config_with(**{"model.token_layout": "spatial"}), workdir)


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_checkpoint(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  good_step, good_params, _ = restore_state(workdir)
  real = losses.wmle_loss
  monkeypatch.setattr(losses, "wmle_loss", lambda *a, **k: (real(*a, **k)[0] * np.nan, real(*a, **k)[1]))
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite .*loss.* at step 13"):
    train.train_and_evaluate(trained.config_with(num_train_steps=20), str(workdir))
  step, params, _ = restore_state(workdir)
  assert step == good_step == 12
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(good_params)):
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


def test_checkpoint_restore_params_roundtrip(trained):
  step, params, _ = restore_state(trained.workdir)
  config = trained.config
  abstract = models.abstract_params(models.from_config(config.model))
  restored, saved, s = checkpoints.restore_params(str(trained.workdir / "checkpoints"), abstract, config.to_dict())
  assert s == step == 12 and saved["model"]["bits"] == 16
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_init_checkpoint_seeds_params_only(trained, tmp_path):
  _, params_a, _ = restore_state(trained.workdir)
  config = trained.config_with(num_train_steps=4, init_checkpoint=str(trained.workdir / "checkpoints"))
  splits = input_pipeline.build_splits(config, str(tmp_path / "b"))
  mesh = sharding.make_mesh(config.mesh)
  state = train.initial_state(train.build(config, splits, mesh), config)
  assert int(state.step) == 0 and float(np.abs(state.bank_u).sum()) == 0.0  # a fresh run...
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params_a)):
    np.testing.assert_array_equal(a, b)  # ...starting from the given params


@pytest.mark.slow
def test_init_checkpoint_of_another_code_length_seeds_all_but_the_hash_layer(trained, tmp_path):
  _, params_a, _ = restore_state(trained.workdir)  # 16 bits
  init = str(trained.workdir / "checkpoints")
  config = trained.config_with(num_train_steps=4, init_checkpoint=init, **{"model.bits": 32})
  splits = input_pipeline.build_splits(config, str(tmp_path / "b"))
  mesh = sharding.make_mesh(config.mesh)
  setup = train.build(config, splits, mesh)
  seeded = jax.device_get(train.initial_state(setup, config).params)
  fresh = jax.device_get(train.initial_state(setup, trained.config_with(**{"model.bits": 32})).params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(seeded)[0]]
  head = [i for i, p in enumerate(paths) if "hashlayer" in p]
  assert head and len(head) < len(paths)
  for i, (s, a, f) in enumerate(zip(jax.tree.leaves(seeded), jax.tree.leaves(params_a), jax.tree.leaves(fresh))):
    if i in head and s.shape != a.shape:
      np.testing.assert_array_equal(s, f)  # the 32-bit hash layer keeps its initialisation
    else:
      np.testing.assert_array_equal(s, a)  # everything else comes from the 16-bit checkpoint
  assert sum(s.shape != a.shape for s, a in zip(jax.tree.leaves(seeded), jax.tree.leaves(params_a))) >= 1
  other = trained.config_with(init_checkpoint=init, **{"model.bits": 32, "model.embed_dims": (8, 16, 24)})
  with pytest.raises(ValueError, match=r"model\.embed_dims"):  # any other model field must match
    train.initial_state(train.build(other, splits, mesh), other)


@pytest.mark.slow
def test_missing_init_checkpoint_exits_with_one_message(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "hybridhash_jax.main", f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
       f"--config.init_checkpoint={tmp_path / 'nope'}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env())
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert f"error: no checkpoint directory {tmp_path / 'nope'}" in proc.stderr
  assert "python -m hybridhash_jax.convert" in proc.stderr
  assert not (tmp_path / "nope").exists()


def test_missing_init_checkpoint_is_named_with_the_recipe(tmp_path):
  config = tiny_config(init_checkpoint=str(tmp_path / "nope"))
  splits = input_pipeline.build_splits(config, str(tmp_path / "w"))
  setup = train.build(config, splits, sharding.make_mesh(config.mesh))
  with pytest.raises(FileNotFoundError, match=r"(?s)no checkpoint directory .*nope.*python -m hybridhash_jax\.convert"):
    train.initial_state(setup, config)
  assert not (tmp_path / "nope").exists()


@pytest.mark.slow
def test_skipped_training_images_leave_the_bank_pairs(tmp_path, monkeypatch):
  """The check's bad training rows form no pair; rows past the training set (the reference's zero
  rows, loss.memory_bank_size larger than it) still do."""
  root = str(tmp_path / "data")
  rows = data_fixtures.write_listfile(root, {"train": 16, "query": 4, "database": 8}, num_classes=5)
  with open(os.path.join(root, rows["train"][3][0]), "wb") as f:
    f.write(b"not an image")
  config = tiny_config(**{"data.name": "listfile", "data.num_classes": 5, "data.list_dir": root, "data.root": root,
                          "data.on_bad_image": "skip", "loss.memory_bank_size": 20})
  splits = input_pipeline.build_splits(config, str(tmp_path / "w"))
  setup = train.build(config, splits, sharding.make_mesh(config.mesh))
  np.testing.assert_array_equal(setup.bank_valid, np.arange(20) != 3)
  seen, real = [], losses.wmle_loss
  monkeypatch.setattr(losses, "wmle_loss", lambda *a: seen.append(a[5]) or real(*a))
  batch = next(iter(input_pipeline.train_loader(config, splits, seed=0, local_batch_size=8, worker_count=0)))
  train.make_train_step(setup, config)(train.initial_state(setup, config), sharding.global_batch(setup.mesh, batch))
  np.testing.assert_array_equal(seen[0], np.arange(20) != 3)  # the step hands the mask to the loss


@pytest.mark.slow
def test_an_error_after_training_began_saves_a_checkpoint_first(tmp_path, monkeypatch):
  from hybridhash_jax.data import images

  def bad_database(*args, **kwargs):
    raise images.BadImageError("db/7.png: cannot decode image (truncated)")

  monkeypatch.setattr(evaluate.Evaluator, "run", bad_database)
  # 200 training images in batches of 8: the first evaluation is at step 25, no checkpoint is due before 100.
  config = tiny_config(num_train_steps=30, eval_every_epochs=1, checkpoint_every_steps=100)
  with pytest.raises(images.BadImageError, match="db/7.png"):
    train.train_and_evaluate(config, str(tmp_path))
  step, params, _ = restore_state(tmp_path)
  assert step == 25 and all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
