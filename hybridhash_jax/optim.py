"""The optimiser from `config.optimizer`: the paper's PyTorch RMSprop, or AdamW.

PyTorch's RMSprop (no momentum, not centred) is, step by step,
  g <- g + weight_decay * p                 (L2 added to the gradient)
  v <- decay * v + (1 - decay) * g^2        (v starts at 0)
  p <- p - lr * g / (sqrt(v) + eps)         (eps outside the root)
which is optax's `add_decayed_weights` followed by `rmsprop(initial_scale=0,
eps_in_sqrt=False)`; optax's default `eps_in_sqrt=True` would differ.
"""

import ml_collections
import optax

from hybridhash_jax import choices
from hybridhash_jax import errors

NAMES = choices.OPTIMIZERS
SCHEDULES = choices.SCHEDULES


def learning_rate_schedule(opt_config: ml_collections.ConfigDict,
                           num_train_steps: int) -> optax.Schedule:
  """Learning rate per step: constant, or linear warmup from 0 then cosine decay to 0."""
  lr = opt_config.learning_rate
  warmup = opt_config.warmup_steps
  if opt_config.schedule == "constant":
    if warmup != 0:
      raise errors.ConfigError(f"optimizer.warmup_steps={warmup} needs optimizer.schedule='warmup_cosine'.")
    return optax.constant_schedule(lr)
  if opt_config.schedule == "warmup_cosine":
    if not 0 <= warmup < num_train_steps:
      raise errors.ConfigError(f"optimizer.warmup_steps={warmup} must be in [0, num_train_steps="
                       f"{num_train_steps}).")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=num_train_steps,
        end_value=0.0)
  raise errors.ConfigError(f"optimizer.schedule={opt_config.schedule!r}; expected one of {SCHEDULES}.")


def make_optimizer(opt_config: ml_collections.ConfigDict,
                   num_train_steps: int) -> optax.GradientTransformation:
  """The optimiser named by `optimizer.name`, with its learning-rate schedule."""
  lr = learning_rate_schedule(opt_config, num_train_steps)
  if opt_config.name == "rmsprop":
    return optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay),
        optax.rmsprop(lr, decay=opt_config.rmsprop_decay, eps=opt_config.eps,
                      initial_scale=0.0, eps_in_sqrt=False, centered=False, momentum=None))
  if opt_config.name == "adamw":
    # Decoupled decay, scaled by the learning rate as in PyTorch's AdamW.
    return optax.adamw(lr, eps=opt_config.eps, weight_decay=opt_config.weight_decay)
  raise errors.ConfigError(f"optimizer.name={opt_config.name!r}; expected one of {NAMES}.")
