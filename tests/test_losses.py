"""WMLE loss and memory bank against the reference's printed losses and a NumPy re-derivation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridhash_jax import losses


def numpy_wmle(u, y, U, Y, alpha):
  """Float64 loss and d loss / d u, written from the loss's formula with explicit masks."""
  u, y, U, Y = (np.asarray(a, np.float64) for a in (u, y, U, Y))
  s = (y @ Y.T > 0).astype(np.float64)
  theta = alpha * u @ U.T
  l = np.log(1.0 + np.exp(theta)) - s * theta  # naive form; |theta| is small here
  n1, n0 = s.sum(), (1 - s).sum()
  n = n0 + n1
  w = np.zeros_like(s)
  if n1:
    w[s == 1] = n / n1
  if n0:
    w[s == 0] = n / n0
  loss = (w * l).sum() / n
  dl_dtheta = 1.0 / (1.0 + np.exp(-theta)) - s
  grad = alpha * (w * dl_dtheta / n) @ U
  return loss, grad


def random_case(seed, batch=6, rows=20, bits=12, classes=4, multilabel=False):
  rng = np.random.default_rng(seed)
  u = np.tanh(rng.normal(size=(batch, bits)) * 2).astype(np.float32)
  U = np.tanh(rng.normal(size=(rows, bits)) * 2).astype(np.float32)
  if multilabel:
    y = (rng.random((batch, classes)) < 0.3).astype(np.float32)
    Y = (rng.random((rows, classes)) < 0.3).astype(np.float32)
  else:
    y = np.eye(classes, dtype=np.float32)[rng.integers(classes, size=batch)]
    Y = np.eye(classes, dtype=np.float32)[rng.integers(classes, size=rows)]
  return u, y, U, Y


def test_golden_sequence_matches_reference(golden_dir):
  g = np.load(golden_dir / "wmle_loss_sequence.npz")
  u_all, y_all, ind_all = g["u"], g["y"], g["ind"]
  U, Y = losses.init_bank(int(g["bank_size"]), u_all.shape[-1], y_all.shape[-1])

  @jax.jit
  def step(U, Y, u, y, index):
    U, Y = losses.update_bank(U, Y, u, y, index)
    return (U, Y), losses.wmle_loss(u, y, U, Y, float(g["alpha"]))[0]

  got = []
  for u, y, ind in zip(u_all, y_all, ind_all):
    (U, Y), loss = step(U, Y, u, y, ind)
    got.append(float(loss))
  np.testing.assert_allclose(got, g["loss"], rtol=0, atol=1e-5)


def test_update_bank_writes_rows_and_detaches():
  U, Y = losses.init_bank(5, 3, 2)
  u = jnp.array([[1., 2., 3.], [4., 5., 6.]], jnp.bfloat16)
  y = jnp.array([[0, 1], [1, 0]], jnp.int32)
  U, Y = losses.update_bank(U, Y, u, y, jnp.array([3, 0]))
  assert U.dtype == Y.dtype == jnp.float32
  np.testing.assert_array_equal(U, [[4, 5, 6], [0, 0, 0], [0, 0, 0], [1, 2, 3], [0, 0, 0]])
  np.testing.assert_array_equal(Y, [[1, 0], [0, 0], [0, 0], [0, 1], [0, 0]])
  grad = jax.grad(lambda u: losses.update_bank(U, Y, u, y, jnp.array([1, 2]))[0].sum())(
      u.astype(jnp.float32))
  np.testing.assert_array_equal(grad, np.zeros((2, 3)))


@pytest.mark.parametrize("seed,multilabel", [(0, False), (1, True), (2, True)])
def test_loss_and_grad_match_numpy(seed, multilabel):
  u, y, U, Y = random_case(seed, multilabel=multilabel)
  want_loss, want_grad = numpy_wmle(u, y, U, Y, alpha=0.5)
  loss, aux = losses.wmle_loss(u, y, U, Y, alpha=0.5)
  grad = jax.grad(lambda u: losses.wmle_loss(u, y, U, Y, alpha=0.5)[0])(jnp.asarray(u))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
  s = y @ Y.T > 0
  assert aux["pairs_similar"] == s.sum() and aux["pairs_dissimilar"] == (~s).sum()
  np.testing.assert_allclose(aux["theta_mean"], (0.5 * u @ U.T).mean(), rtol=1e-5)


def test_gradient_flows_through_u_only():
  u, y, U, Y = random_case(3)
  gU, gY = jax.grad(lambda U, Y: losses.wmle_loss(u, y, U, Y)[0], argnums=(0, 1))(U, Y)
  np.testing.assert_array_equal(gU, 0)
  np.testing.assert_array_equal(gY, 0)


@pytest.mark.parametrize("case", ["no_similar", "no_dissimilar"])
def test_empty_pair_class_is_finite_and_matches_numpy(case):
  u, y, U, Y = random_case(4)
  if case == "no_similar":
    y = np.zeros_like(y)
  else:
    y = np.ones_like(y)
    Y = np.ones_like(Y)
  loss, aux = losses.wmle_loss(u, y, U, Y)
  want_loss, want_grad = numpy_wmle(u, y, U, Y, alpha=0.5)
  assert (aux["pairs_similar"] if case == "no_similar" else aux["pairs_dissimilar"]) == 0
  # With one class empty the loss is the plain mean of l over all pairs.
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda u: losses.wmle_loss(u, y, U, Y)[0])(u), want_grad,
                             rtol=1e-5, atol=1e-8)


def test_bfloat16_input_is_computed_in_float32():
  u, y, U, Y = random_case(5, batch=8, rows=64, bits=32)
  u_bf16 = jnp.asarray(u, jnp.bfloat16)
  loss_bf16, _ = losses.wmle_loss(u_bf16, y, U, Y)
  assert loss_bf16.dtype == jnp.float32
  # Same as the float32 loss of the rounded codes (no bf16 arithmetic inside) ...
  want, _ = numpy_wmle(np.asarray(u_bf16.astype(jnp.float32)), y, U, Y, alpha=0.5)
  np.testing.assert_allclose(loss_bf16, want, rtol=1e-6)
  # ... and within bf16 input rounding of the float32 loss.
  np.testing.assert_allclose(loss_bf16, losses.wmle_loss(u, y, U, Y)[0], rtol=1e-2)


def test_bigger_bank_adds_zero_rows_as_dissimilar_log2_pairs():
  u, y, U, Y = random_case(6, batch=5, rows=10)
  extra = 7
  loss, aux = losses.wmle_loss(u, y, U, Y)
  U_big, Y_big = losses.init_bank(len(U) + extra, U.shape[1], Y.shape[1])
  U_big, Y_big = U_big.at[:len(U)].set(U), Y_big.at[:len(Y)].set(Y)
  loss_big, aux_big = losses.wmle_loss(u, y, U_big, Y_big)

  # loss = mean_similar(l) + mean_dissimilar(l); the zero rows add B*extra pairs with l = log 2.
  s = y @ Y.T > 0
  l = np.log1p(np.exp(0.5 * u.astype(np.float64) @ U.T)) - s * (0.5 * u.astype(np.float64) @ U.T)
  n_new = len(u) * extra
  want = l[s].mean() + (l[~s].sum() + n_new * np.log(2)) / ((~s).sum() + n_new)
  assert aux_big["pairs_dissimilar"] == aux["pairs_dissimilar"] + n_new
  assert aux_big["pairs_similar"] == aux["pairs_similar"]
  np.testing.assert_allclose(loss_big, want, rtol=1e-6)
  assert not np.isclose(loss_big, loss)


def test_bank_size():
  assert losses.bank_size(-1, 5000) == 5000
  assert losses.bank_size(10000, 5000) == 10000
  assert losses.bank_size(5000, 5000) == 5000
  with pytest.raises(ValueError, match="loss.memory_bank_size"):
    losses.bank_size(4999, 5000)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("bank_spec", [(), ("data",)])
def test_sharded_batch_matches_unsharded(axis_type, bank_spec):
  """The train step feeds a batch sharded over 'data' and a replicated or row-sharded bank."""
  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((4,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  u, y, U, Y = random_case(7, batch=8, rows=24)
  index = np.arange(8) * 3

  def step(U, Y, u, y, index):
    U, Y = losses.update_bank(U, Y, u, y, index)
    loss, grad = jax.value_and_grad(lambda u: losses.wmle_loss(u, y, U, Y)[0])(u)
    return loss, grad, U

  want_loss, want_grad, want_U = step(U, Y, u, y, index)
  bank = [jax.device_put(a, jax.sharding.NamedSharding(mesh, P(*bank_spec))) for a in (U, Y)]
  batch = [jax.device_put(a, jax.sharding.NamedSharding(mesh, P("data"))) for a in (u, y, index)]
  with jax.set_mesh(mesh):
    loss, grad, new_U = jax.jit(step)(*bank, *batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(new_U, want_U)
  assert new_U.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(*bank_spec)), 2)


def test_invalid_bank_rows_form_no_pairs():
  """Rows marked invalid (skipped images) weigh as if they were not in the bank; all-valid is the default."""
  u, y, U, Y = random_case(3, rows=20, multilabel=True)
  valid = np.ones(20, bool)
  valid[[2, 7, 8]] = False
  loss, aux = losses.wmle_loss(u, y, U, Y, alpha=0.5, valid=valid)
  want, want_aux = losses.wmle_loss(u, y, U[valid], Y[valid], alpha=0.5)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert (aux["pairs_similar"], aux["pairs_dissimilar"]) == (want_aux["pairs_similar"], want_aux["pairs_dissimilar"])
  grad = jax.grad(lambda u: losses.wmle_loss(u, y, U, Y, 0.5, valid)[0])(jnp.asarray(u))
  want_grad = jax.grad(lambda u: losses.wmle_loss(u, y, U[valid], Y[valid], 0.5)[0])(jnp.asarray(u))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(losses.wmle_loss(u, y, U, Y, 0.5, np.ones(20, bool))[0],
                                losses.wmle_loss(u, y, U, Y, 0.5)[0])
