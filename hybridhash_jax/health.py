"""Training-health signals: code statistics logged with the loss, and a plain warning on collapse.

WMLE has two dead ends from a fresh start. Codes stuck near 0 (the saddle: theta ~ 0, the loss sits
at 2 ln 2 and its gradient vanishes) and codes saturated to one sign pattern (every pair looks
similar, the loss sits at alpha * bits and tanh passes no gradient). Both show in three numbers
of the batch's codes, which the train step returns with the loss.
"""

import math

from absl import logging
import jax
import jax.numpy as jnp

SADDLE_MEAN_ABS = 0.1  # mean |u| below this, with the WMLE loss within SADDLE_LOSS of 2 ln 2: the saddle
SADDLE_LOSS = 0.01
SATURATED_MEAN_ABS = 0.99  # mean |u| above this with one code in the batch: saturated
PATIENCE = 3  # log intervals in a row before the warning

_ADVICE = {
    "saddle": ("codes are stuck near 0 (mean |u| {mean_abs_u:.3f}, WMLE loss {wmle:.4f} ~ 2 ln 2): the WMLE "
               "saddle. Try the from-scratch recipe (config_lib.from_scratch: loss.bank_init=codes, "
               "model.hash_init_std=0.08, AdamW), a larger optimizer.learning_rate, or start from NesT-B "
               "weights (init_checkpoint)."),
    "saturated": ("every code in the batch has saturated to one sign pattern (mean |u| {mean_abs_u:.3f}, "
                  "{distinct_codes:.0f} distinct code(s), loss {loss:.4f}): tanh passes no gradient. Try a "
                  "lower optimizer.learning_rate, a warm-up (optimizer.schedule=warmup_cosine, "
                  "optimizer.warmup_steps), or the paper's loss.alpha=0.5 if it is lower."),
}


def code_stats(u: jax.Array) -> dict[str, jax.Array]:
  """Mean |u|, the fraction of bits whose sign is the same over the batch, and distinct sign codes."""
  u = jnp.asarray(u, jnp.float32)
  bits = u >= 0  # the sign convention of `metrics.pack_codes`
  constant = jnp.all(bits == bits[:1], axis=0)
  same = jnp.all(bits[:, None, :] == bits[None, :, :], axis=-1)  # (B, B): code i equals code j
  earlier = jnp.tril(same, k=-1)  # j < i
  distinct = jnp.sum(~jnp.any(earlier, axis=1))
  return dict(mean_abs_u=jnp.mean(jnp.abs(u)), constant_bits=jnp.mean(constant.astype(jnp.float32)),
              distinct_codes=distinct.astype(jnp.float32))


def collapse(metrics: dict) -> str | None:
  """'saddle', 'saturated' or None for one logged step's metrics (host floats)."""
  if metrics["mean_abs_u"] < SADDLE_MEAN_ABS and abs(metrics["wmle"] - 2 * math.log(2)) < SADDLE_LOSS:
    return "saddle"
  if metrics["mean_abs_u"] > SATURATED_MEAN_ABS and metrics["distinct_codes"] <= 1:
    return "saturated"
  return None


class CollapseMonitor:
  """Warns once, in one line, when `PATIENCE` log intervals in a row sit in the same collapse."""

  def __init__(self, patience: int = PATIENCE):
    self._patience, self._kind, self._count = patience, None, 0

  def update(self, step: int, metrics: dict) -> str | None:
    """Feeds one logged step; returns (and logs) the warning when it is due, else None."""
    kind = collapse(metrics)
    self._count = self._count + 1 if kind is not None and kind == self._kind else int(kind is not None)
    self._kind = kind
    if kind is None or self._count != self._patience:
      return None
    message = f"training has collapsed for {self._count} log intervals (step {step}): " + _ADVICE[kind].format(
        **metrics)
    logging.warning(message)
    return message
