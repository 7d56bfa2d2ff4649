"""The optimiser against PyTorch's documented RMSprop, and the schedules by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hybridhash_jax import config_lib
from hybridhash_jax import optim


def opt_config(**overrides):
  c = config_lib.base_config().optimizer
  c.update(overrides)
  return c


def torch_rmsprop(params, grads, lr, alpha, eps, weight_decay):
  """torch.optim.RMSprop's documented algorithm (no momentum, not centred), in float64."""
  params = [np.asarray(p, np.float64) for p in params]
  square_avg = [np.zeros_like(p) for p in params]
  for step_grads in grads:
    for k, g in enumerate(step_grads):
      g = np.asarray(g, np.float64) + weight_decay * params[k]
      square_avg[k] = alpha * square_avg[k] + (1 - alpha) * g * g
      params[k] = params[k] - lr * g / (np.sqrt(square_avg[k]) + eps)
  return params


def test_rmsprop_matches_pytorch_three_steps():
  rng = np.random.default_rng(0)
  shapes = {"w": (3, 4), "b": (4,)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  # Gradients of very different scales, so eps and the L2 term both matter.
  grads = [{k: (rng.normal(size=s) * 10.0**rng.integers(-6, 1, size=s)).astype(np.float32)
            for k, s in shapes.items()} for _ in range(3)]
  lr, decay, eps, wd = 1e-2, 0.9, 1e-6, 1e-1  # large lr and wd so each term is visible
  tx = optim.make_optimizer(opt_config(learning_rate=lr, rmsprop_decay=decay, eps=eps,
                                       weight_decay=wd), num_train_steps=3)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  keys = sorted(shapes)
  want = torch_rmsprop([params[k] for k in keys], [[g[k] for k in keys] for g in grads],
                       lr, decay, eps, wd)
  for k, w in zip(keys, want):
    np.testing.assert_allclose(p[k], w, rtol=1e-6, atol=1e-7)
    assert not np.allclose(params[k], w, rtol=1e-3)


def test_rmsprop_eps_is_outside_the_root():
  """One step from zero state: g / (sqrt((1-a) g^2) + eps); eps inside the root differs."""
  g, eps, decay, lr = 1e-4, 1e-4, 0.99, 1.0
  tx = optim.make_optimizer(opt_config(learning_rate=lr, rmsprop_decay=decay, eps=eps,
                                       weight_decay=0.0), num_train_steps=1)
  p = jnp.zeros(())
  updates, _ = tx.update(jnp.float32(g), tx.init(p), p)
  np.testing.assert_allclose(updates, -lr * g / (math.sqrt((1 - decay) * g * g) + eps), rtol=1e-6)


def test_warmup_cosine_schedule_values():
  c = opt_config(learning_rate=1.0, schedule="warmup_cosine", warmup_steps=4)
  sched = optim.learning_rate_schedule(c, num_train_steps=12)
  want = {0: 0.0, 2: 0.5, 4: 1.0, 8: 0.5 * (1 + math.cos(math.pi * 4 / 8)), 12: 0.0, 20: 0.0}
  for step, value in want.items():
    np.testing.assert_allclose(sched(step), value, atol=1e-6, err_msg=f"step {step}")


def test_constant_schedule():
  sched = optim.learning_rate_schedule(opt_config(learning_rate=3e-4), num_train_steps=10)
  np.testing.assert_allclose([sched(0), sched(9), sched(100)], 3e-4)


def test_adamw_runs_with_schedule_and_decoupled_decay():
  c = opt_config(name="adamw", learning_rate=0.1, weight_decay=0.5, schedule="warmup_cosine",
                 warmup_steps=1)
  tx = optim.make_optimizer(c, num_train_steps=4)
  p = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(p)
  # Step 0 has lr 0; step 1 has lr 0.1 and a zero gradient, so only the decay moves p ...
  for g in ([3.0, 3.0], [0.0, 0.0]):
    before = p["w"]
    updates, state = tx.update({"w": jnp.array(g)}, state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_array_equal(before, [1.0, -2.0])
  # ... plus Adam's step from the first moment 0.9 * 0.1 * 3 (bias-corrected by 1 - 0.9^2).
  m = 0.9 * 0.1 * 3.0 / (1 - 0.9**2)
  v = 0.999 * 0.001 * 9.0 / (1 - 0.999**2)
  want = before - 0.1 * (m / (np.sqrt(v) + 1e-8) + 0.5 * before)
  np.testing.assert_allclose(p["w"], want, rtol=1e-5)


@pytest.mark.parametrize("field,overrides", [
    ("optimizer.name", dict(name="sgd")),
    ("optimizer.schedule", dict(schedule="linear")),
    ("optimizer.warmup_steps", dict(schedule="warmup_cosine", warmup_steps=10)),
    ("optimizer.warmup_steps", dict(warmup_steps=2)),
])
def test_bad_config_names_the_field(field, overrides):
  with pytest.raises(ValueError, match=field):
    optim.make_optimizer(opt_config(**overrides), num_train_steps=10)
