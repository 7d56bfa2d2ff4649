"""The weighted maximum-likelihood (WMLE) pairwise loss against a memory bank.

Each batch code u_i is compared with every row of a bank (U, Y) that holds the latest
detached code and label of each training image, so one batch sees pairs with the whole
training set. The bank lives in the train state; these are pure functions of it, in plain
jnp, so a jitted, sharded train step partitions them like any other op.
"""

import jax
import jax.numpy as jnp

from hybridhash_jax import errors

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 dots even where the default is TF32/bf16.


def bank_size(memory_bank_size: int, num_train: int) -> int:
  """Rows of the bank: -1 means the training-set size.

  A larger bank reproduces the reference's CIFAR-10 quirk (10,000 rows for 5,000 images):
  the rows never written stay zero and count as dissimilar pairs with theta = 0.
  """
  if memory_bank_size == -1:
    return num_train
  if memory_bank_size < num_train:
    raise errors.ConfigError(
        f"loss.memory_bank_size={memory_bank_size} is smaller than the training set "
        f"({num_train} images); use -1 for the training-set size.")
  return memory_bank_size


def init_bank(num_rows: int, bits: int, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Zero bank U (num_rows, bits) and Y (num_rows, num_classes), float32 as in the reference."""
  return (jnp.zeros((num_rows, bits), jnp.float32),
          jnp.zeros((num_rows, num_classes), jnp.float32))


def update_bank(U: jax.Array, Y: jax.Array, u: jax.Array, y: jax.Array,
                index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes the batch's detached codes and labels into rows `index` of the bank.

  `index` holds dataset rows in [0, num_rows); a batch should not repeat one. If it does,
  which of the duplicates lands is unspecified (XLA scatter), as in the reference.
  """
  U, Y = jnp.asarray(U), jnp.asarray(Y)
  u = jax.lax.stop_gradient(u).astype(U.dtype)
  y = jax.lax.stop_gradient(y).astype(Y.dtype)
  # The bank keeps its own sharding; under explicit mesh axes JAX cannot infer it from a
  # batch-sharded update.
  return (U.at[index].set(u, out_sharding=jax.typeof(U).sharding),
          Y.at[index].set(y, out_sharding=jax.typeof(Y).sharding))


def wmle_loss(u: jax.Array, y: jax.Array, U: jax.Array, Y: jax.Array,
              alpha: float = 0.5, valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Class-balanced pairwise log-likelihood of the batch (u, y) against the bank (U, Y).

  With s = [y_i . Y_j > 0], theta = alpha * u_i . U_j and l = softplus(theta) - s * theta,
  similar pairs weigh S / S1 and dissimilar ones S / S0, and the loss is sum(w * l) / S.
  That equals mean(l | similar) + mean(l | dissimilar), so when a class has no pairs its
  (undefined) weight is irrelevant: it contributes 0, as in the reference, never NaN.
  Computed in float32 whatever u's dtype; the gradient flows through u only. `valid` (bank rows,)
  is False on rows that form no pair (skipped images); None: every row pairs, including rows never
  written (the reference's zero rows).

  Returns:
    loss, and aux with the pair counts and the mean theta for logging.
  """
  u = jnp.asarray(u, jnp.float32)
  U = jax.lax.stop_gradient(U).astype(jnp.float32)
  Y = jax.lax.stop_gradient(Y).astype(jnp.float32)
  # Pairs are laid out like the batch (B, bank rows): a row-sharded bank is gathered.
  pairs = jax.typeof(u).sharding
  similar = jnp.dot(y.astype(jnp.float32), Y.T, precision=_HIGHEST, out_sharding=pairs) > 0
  theta = alpha * jnp.dot(u, U.T, precision=_HIGHEST, out_sharding=pairs)
  s = similar.astype(jnp.float32)
  l = jnp.log1p(jnp.exp(-jnp.abs(theta))) + jnp.maximum(theta, 0.0) - s * theta

  # Pairs with an invalid row weigh 0 and are not counted (the counts stay exact integers).
  v = jnp.ones((1, U.shape[0]), jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)[None, :]
  n_similar, n_dissimilar = jnp.sum(s * v), jnp.sum((1.0 - s) * v)
  n_pairs = n_similar + n_dissimilar
  w = jnp.where(similar, n_pairs / jnp.maximum(n_similar, 1.0),
                n_pairs / jnp.maximum(n_dissimilar, 1.0))
  loss = jnp.sum(w * l * v) / n_pairs
  aux = dict(pairs_similar=n_similar, pairs_dissimilar=n_dissimilar,
             theta_mean=jnp.mean(theta))
  return loss, aux


def quantization_loss(u: jax.Array) -> jax.Array:
  """mean((|u| - 1)^2): pulls the tanh codes away from 0 towards the binary codes (as DPSH, DSH).

  Off in the paper (`loss.quantization_weight=0`). From scratch, codes start near 0, where the
  WMLE gradient vanishes with the bank's codes; this term gives every code a gradient of its own.
  """
  return jnp.mean(jnp.square(jnp.abs(jnp.asarray(u, jnp.float32)) - 1.0))
