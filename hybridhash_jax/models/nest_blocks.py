"""The NesT pieces HybridHash reuses: blocking, block-local transformer layers, init.

Layouts follow timm's NesT (which the NesT-B and HybridHash weights assume): qkv features
are ordered (q|k|v, head, dim) and heads are merged head-minor (channel = dim * heads + head).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The reference draws weights from N(0, .02) truncated at +-2 *absolute*, i.e. +-100 sigma:
# the truncation never fires, so a plain normal is the same distribution.
weight_init = nn.initializers.normal(0.02)
LN_EPS = 1e-6


def dense(features: int, name: str, dtype: Any, param_dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, kernel_init=weight_init, dtype=dtype, param_dtype=param_dtype,
                  name=name)


def layer_norm(name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
  # Flax reduces LayerNorm statistics in float32 even for bfloat16 inputs.
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


def blockify(x: jax.Array, block: int) -> jax.Array:
  """(B, H, W, C) -> (B, T, N, C): blocks row-major, tokens row-major inside a block."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // block) * (w // block), block * block, c)


def deblockify(x: jax.Array, block: int) -> jax.Array:
  """Inverse of `blockify` for a square grid of blocks."""
  b, t, _, c = x.shape
  grid = round(t ** 0.5)
  x = x.reshape(b, grid, grid, block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * block, grid * block, c)


def multi_head_attention(qkv: jax.Array, num_heads: int, implementation: str = "einsum") -> jax.Array:
  """Softmax attention over axis -2 of `qkv` (..., N, 3C); returns (..., N, C) head-minor.

  "einsum": logits and softmax are float32 whatever the compute dtype, and the value product
  accumulates in float32. The softmax is normalised after the value product (N x d values to divide,
  not N x N), its max subtracted as a constant (it cancels): on XLA:CPU this halves the step's
  attention time.
  "xla" | "cudnn": `jax.nn.dot_product_attention` with that implementation, the leading (batch and
  block) axes folded into its batch axis; cuDNN's fused kernel is for GPUs in bfloat16 or float16.
  """
  *lead, n, c3 = qkv.shape
  c = c3 // 3
  d = c // num_heads
  if implementation != "einsum":
    q, k, v = jnp.moveaxis(qkv.reshape(-1, n, 3, num_heads, d), -3, 0)
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)  # (B', N, heads, d)
    return out.swapaxes(-1, -2).reshape(*lead, n, c)
  q, k, v = jnp.moveaxis(qkv.reshape(*lead, n, 3, num_heads, d), (-3, -2), (0, -3))  # (..., heads, N, d)
  # Scaling q, not the N x N logits: XLA:CPU would materialise the scalar broadcast to N x N.
  logits = jnp.einsum("...qd,...kd->...qk", q * jnp.asarray(d ** -0.5, q.dtype), k, preferred_element_type=jnp.float32)
  e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  out = jnp.einsum("...qk,...kd->...qd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = (out / e.sum(-1, keepdims=True)).astype(v.dtype)
  return jnp.moveaxis(out, -3, -1).reshape(*lead, n, c)  # (..., N, d, heads): the head-minor merge


class Attention(nn.Module):
  """Block-local multi-head self-attention on (B, T, N, C)."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  implementation: str = "einsum"  # see `multi_head_attention`

  @nn.compact
  def __call__(self, x):
    c, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = multi_head_attention(dense(3 * c, "qkv", **kw)(x), self.num_heads, self.implementation)
    return dense(c, "proj", **kw)(y)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.gelu(dense(self.hidden, "fc1", **kw)(x), approximate=False)  # exact erf GELU
    return dense(x.shape[-1], "fc2", **kw)(y)


class TransformerLayer(nn.Module):
  """Pre-norm layer with per-sample stochastic depth on both residual branches."""
  num_heads: int
  mlp_ratio: float
  drop_path: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "einsum"  # see `multi_head_attention`

  def _drop_path(self, y, train):
    if not train or self.drop_path == 0.0:
      return y
    keep = 1.0 - self.drop_path
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, 0).astype(y.dtype)

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layer_norm("norm1", **kw)(x)
    x = x + self._drop_path(Attention(self.num_heads, name="attn", implementation=self.attention, **kw)(y), train)
    y = layer_norm("norm2", **kw)(x)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + self._drop_path(Mlp(hidden, name="mlp", **kw)(y), train)
