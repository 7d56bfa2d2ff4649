"""Training: the mesh, the sharded state, the jitted step, the loop, checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is what `main.py` and the notebook call. A run
resumes from the latest checkpoint in `workdir/checkpoints`; otherwise it initialises,
taking params from `config.init_checkpoint` when given.
"""

import dataclasses
import functools
import signal
import time
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hybridhash_jax import checkpoints
from hybridhash_jax import config_lib
from hybridhash_jax import errors
from hybridhash_jax import evaluate
from hybridhash_jax import health
from hybridhash_jax import input_pipeline
from hybridhash_jax import interrupts
from hybridhash_jax import losses
from hybridhash_jax import metric_writer
from hybridhash_jax import models
from hybridhash_jax import optim
from hybridhash_jax import sharding
from hybridhash_jax import workdir_lock
from hybridhash_jax.data import check

# The init is one threefry draw per param, which XLA:CPU's default LLVM level (3) is slow to compile:
# 12-20 s of a small model's start, against about 6 s at level 2, with the same bits (a test checks).
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  bank_u: jax.Array  # (bank rows, bits): the memory bank of detached outputs
  bank_y: jax.Array  # (bank rows, classes): their labels
  rng: jax.Array

  def train_items(self) -> dict:
    """Everything but params, as checkpointed under `train`."""
    return dict(step=self.step, opt_state=self.opt_state, bank_u=self.bank_u, bank_y=self.bank_y,
                rng=self.rng)


NonFiniteLossError = errors.NonFiniteLossError  # what `_check_finite` raises, with the other user errors


@dataclasses.dataclass
class Setup:
  """What the loop needs, built once from the config."""
  model: Any
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_shardings: TrainState
  abstract_state: TrainState
  steps_per_epoch: int
  total_steps: int
  bank_valid: np.ndarray  # (bank rows,): False on the rows of skipped training images, which form no pair


def num_steps(config, steps_per_epoch: int) -> int:
  return config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch


def build(config, splits, mesh) -> Setup:
  """Model, optimiser and the abstract, sharded train state: shapes first, then sharding."""
  model = models.from_config(config.model)
  steps_per_epoch = input_pipeline.steps_per_epoch(config, splits)
  total = num_steps(config, steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, total)
  rows = losses.bank_size(config.loss.memory_bank_size, len(splits.train))
  init = functools.partial(_init_state, model=model, tx=tx, config=config, bank_rows=rows,
                           num_classes=splits.num_classes)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  rep = sharding.replicated(mesh)
  min_size = config.mesh.fsdp_min_size
  params_sh = sharding.tree_shardings(mesh, abstract.params, min_size)
  opt_sh = sharding.tree_shardings(mesh, abstract.opt_state, min_size)
  state_sh = TrainState(step=rep, params=params_sh, opt_state=opt_sh, bank_u=rep, bank_y=rep, rng=rep)
  abstract = sharding.place(abstract, state_sh)
  bank_valid = np.ones(rows, bool)  # rows past the training set (the reference's zero rows) still pair
  bank_valid[:len(splits.train)] = check.valid_rows(splits.train)
  return Setup(model, tx, mesh, state_sh, abstract, steps_per_epoch, total, bank_valid)


def _init_state(rng, *, model, tx, config, bank_rows, num_classes) -> TrainState:
  init_rng, train_rng = jax.random.split(rng)
  size = config.model.img_size
  params = model.init({"params": init_rng}, jnp.zeros((1, size, size, 3), jnp.float32), train=False)["params"]
  bank_u, bank_y = losses.init_bank(bank_rows, config.model.bits, num_classes)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    bank_u=bank_u, bank_y=bank_y, rng=train_rng)


def make_train_step(setup: Setup, config):
  """The jitted, donated step: bank update, WMLE loss, optimiser update; metrics include `health.code_stats`."""
  model, tx = setup.model, setup.tx
  alpha = config.loss.alpha
  bank_valid = None if setup.bank_valid.all() else setup.bank_valid
  quantization = config.loss.quantization_weight

  def step_fn(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    images = input_pipeline.normalize(batch["image"])

    def loss_fn(params):
      u = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
      bank_u, bank_y = losses.update_bank(state.bank_u, state.bank_y, u, batch["label"], batch["index"])
      wmle, _ = losses.wmle_loss(u, batch["label"], bank_u, bank_y, alpha, bank_valid)
      loss = wmle + quantization * losses.quantization_loss(u) if quantization else wmle
      return loss, (bank_u, bank_y, dict(wmle=wmle, **health.code_stats(u)))

    (loss, (bank_u, bank_y, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, bank_u=bank_u,
                              bank_y=bank_y)
    return new_state, {"loss": loss, "grad_norm": grad_norm, **stats}

  batch_sh = sharding.batch_sharding(setup.mesh)
  return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)), donate_argnums=0)


def initial_state(setup: Setup, config) -> TrainState:
  init = functools.partial(_init_state, model=setup.model, tx=setup.tx, config=config,
                           bank_rows=setup.abstract_state.bank_u.shape[0],
                           num_classes=setup.abstract_state.bank_y.shape[1])
  on_cpu = sharding.platform(setup.mesh) == "cpu"
  state = jax.jit(init, out_shardings=setup.state_shardings,
                  compiler_options=CPU_INIT_COMPILER_OPTIONS if on_cpu else None)(jax.random.PRNGKey(config.seed))
  if config.init_checkpoint:
    state = state.replace(params=_init_params(config, setup, state.params))
  return state


def prefill_bank(state: TrainState, setup: Setup, evaluator: evaluate.Evaluator, train_source) -> TrainState:
  """The bank with the model's own codes and labels of the training set (`loss.bank_init="codes"`).

  A zero bank gives theta = 0 for every pair until the rows are written, so a fresh model's first
  epoch has no gradient out of the saddle at u = 0; its own codes, however small, give one from step 1.
  Rows past the training set (a larger `loss.memory_bank_size`) stay zero.
  """
  codes, labels, _ = evaluator.encode(state.params, train_source)  # skipped rows: zeros, and out of bank_valid
  bank_u, bank_y = np.zeros(state.bank_u.shape, np.float32), np.zeros(state.bank_y.shape, np.float32)
  bank_u[:len(codes)], bank_y[:len(labels)] = codes, labels
  put = lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda index: a[index])
  return state.replace(bank_u=put(bank_u, setup.state_shardings.bank_u),
                       bank_y=put(bank_y, setup.state_shardings.bank_y))


def _init_params(config, setup: Setup, fresh: Any) -> Any:
  """The params of `config.init_checkpoint`, onto the run's shardings.

  A checkpoint written for another code length (`model.bits`; NesT-B converted once, say) gives every
  param but the hash layer's, which keep their fresh initialisation; any other model field must match.
  """
  directory = config.init_checkpoint

  def targets(saved: dict) -> dict:
    bits = saved.get("model", {}).get("bits", config.model.bits)
    abstract = models.abstract_params(models.from_config(dict(config.model.to_dict(), bits=bits)))
    return {"params": jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(
        s.shape, a.dtype, sharding=a.sharding if s.shape == a.shape else sharding.replicated(setup.mesh)),
                                   abstract, setup.abstract_state.params)}

  r = checkpoints.restore(directory, targets, config.to_dict(), fields=checkpoints.INIT_FIELDS)
  params, step, saved_bits = r.items["params"], r.step, r.config.get("model", {}).get("bits", config.model.bits)
  kept = [jax.tree_util.keystr(path) for (path, p), f in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                                              jax.tree.leaves(fresh)) if p.shape != f.shape]
  logging.info("Params initialised from %s (step %d)%s.", directory, step,
               f"; written for {saved_bits} bits, so {', '.join(kept)} keep their initialisation" if kept else "")
  return jax.tree.map(lambda p, f: p if p.shape == f.shape else f, params, fresh)


def _check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches the pending step metrics and stops the run at the first non-finite one."""
  fetched = [(step, jax.device_get(m)) for step, m in pending]
  for step, m in fetched:
    bad = [k for k, v in m.items() if not np.isfinite(v)]
    if bad:
      raise NonFiniteLossError(
          f"non-finite {', '.join(bad)} at step {step} ({m}); stopping. The latest checkpoint before "
          "it is intact: lower optimizer.learning_rate or check the data, then rerun to resume.")
  return fetched


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       splits: input_pipeline.Splits | None = None) -> dict:
  """Trains (resuming if possible), evaluates every `eval_every_epochs`, returns the final results.

  `splits` overrides the datasets of `config.data` (in-memory sources, notebooks). The run holds the
  workdir's lock (`workdir_lock`): a second run on the same workdir is refused.
  """
  config_lib.validate_training(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lock.held(workdir), metric_writer.MetricWriter(workdir) as writer:
    return _train_and_evaluate(config, workdir, splits, writer)


def _train_and_evaluate(config, workdir: str, splits, writer: metric_writer.MetricWriter) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  local_batch = sharding.local_batch_size(config.batch_size, mesh, "batch_size")
  splits = splits or input_pipeline.build_splits(config, workdir)
  setup = build(config, splits, mesh)
  logging.info("Mesh %s; %d train images, %d steps/epoch, %d steps.", dict(mesh.shape), len(splits.train),
               setup.steps_per_epoch, setup.total_steps)

  loader = input_pipeline.train_loader(config, splits, seed=config.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count(), local_batch_size=local_batch)
  data_iter = iter(loader)
  mngr = checkpoints.manager(str(epath.Path(workdir) / "checkpoints"), config.keep_checkpoints)
  resumed = checkpoints.resume(mngr, lambda saved: {"params": setup.abstract_state.params,
                                                     "train": setup.abstract_state.train_items(),
                                                     "data_iter": data_iter}, config.to_dict())
  latest = None if resumed is None else resumed.step
  if resumed is not None:
    state = TrainState(params=resumed.items["params"], **resumed.items["train"])
    logging.info("Resumed from %s at step %d.", mngr.directory, latest)
  else:
    state = initial_state(setup, config)

  train_step = make_train_step(setup, config)
  evaluator = evaluate.Evaluator(config, setup.model, mesh, setup.state_shardings.params)
  if latest is None and config.loss.bank_init == "codes":
    state = prefill_bank(state, setup, evaluator, splits.train)
    logging.info("Memory bank filled with the model's codes of the %d training images.", len(splits.train))
  monitor = health.CollapseMonitor()
  eval_every = config.eval_every_epochs * setup.steps_per_epoch
  step = int(jax.device_get(state.step))
  results = evaluate.load_history(workdir)
  pending, t0, t0_step = [], time.perf_counter(), step

  def save(step):
    with checkpoints.saving(mngr):
      checkpoints.save_train(mngr, step, state.params, state.train_items(), data_iter, config.to_dict())

  def save_before_raising(error):
    """Keeps the steps trained since the last checkpoint, unless the loss went non-finite (whose last
    checkpoint must stay the latest), a write failed (the disk is full) or the error left the state unusable."""
    if isinstance(error, (NonFiniteLossError, errors.WriteError)) or step in (start_step, mngr.latest_step()):
      return
    try:
      _check_finite(pending)
      save(step)
      mngr.wait_until_finished()
      logging.warning("Saved step %d to %s before stopping on the error below.", step, mngr.directory)
    except Exception as e:  # noqa: BLE001  # the original error is the one to report
      logging.warning("Could not save step %d before stopping: %s", step, e)

  start_step = step
  with interrupts.deferred() as stop:  # a signal stops the loop after its step (when the CLI handles signals)
    try:
      while step < setup.total_steps and stop.signum is None:
        batch = sharding.global_batch(mesh, next(data_iter))
        state, m = train_step(state, batch)
        step += 1
        pending.append((step, m))
        boundary = step % config.log_every_steps == 0 or step == setup.total_steps
        ckpt_due = step % config.checkpoint_every_steps == 0 or step == setup.total_steps
        eval_due = eval_every > 0 and step % eval_every == 0
        if boundary or ckpt_due or eval_due or mngr.reached_preemption(step):
          fetched = _check_finite(pending)
          pending = []
          if boundary:
            dt = time.perf_counter() - t0
            rate = (step - t0_step) * config.batch_size / dt
            last = fetched[-1][1]
            writer.write(step, {**{k: float(v) for k, v in last.items()}, "images_per_sec": rate,
                                "epoch": step / setup.steps_per_epoch})
            logging.info("step %d/%d epoch %.2f loss %.5f grad_norm %.4f mean|u| %.3f constant bits %.2f "
                         "distinct codes %d %.1f img/s", step, setup.total_steps, step / setup.steps_per_epoch,
                         last["loss"], last["grad_norm"], last["mean_abs_u"], last["constant_bits"],
                         last["distinct_codes"], rate)
            monitor.update(step, {k: float(v) for k, v in last.items()})
            t0, t0_step = time.perf_counter(), step
          if ckpt_due or mngr.reached_preemption(step):
            save(step)
          if eval_due and step != setup.total_steps:
            results = evaluator.run(state.params, splits, step, workdir, results, writer)
    except (Exception, KeyboardInterrupt) as e:
      save_before_raising(e)
      raise
    finally:
      with checkpoints.saving(mngr):
        mngr.wait_until_finished()
    if stop.signum is not None:
      if step != mngr.latest_step():
        _check_finite(pending)
        save(step)
        with checkpoints.saving(mngr):
          mngr.wait_until_finished()
      raise interrupts.Interrupted(stop.signum, f"stopped by {signal.Signals(stop.signum).name}: step {step} is "
                                   f"saved in {mngr.directory}; rerun the same command to resume")
  if results.get("step") != step:
    results = evaluator.run(state.params, splits, step, workdir, results, writer)
  mngr.close()
  return results
