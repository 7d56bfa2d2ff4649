"""HybridHash (He & Wei, ICMR 2024): NesT levels, interaction modules and a hash layer.

Channels-last throughout. Every size comes from the fields: the grid is G = img_size /
patch_size, the block side b = G / 2**(levels - 1) (b = G / 4 for the paper's 3 levels).
Module names mirror the reference's PyTorch names (`levels_1/pool/conv_glo` is
`levels.1.pool.conv_glo`); `hybridhash_jax.convert` relies on that mapping.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from hybridhash_jax import choices
from hybridhash_jax import errors
from hybridhash_jax.models.nest_blocks import (
    TransformerLayer, blockify, deblockify, dense, layer_norm, multi_head_attention, weight_init)

GLOBAL_HEADS = 8  # the reference's global attention always uses 8 heads
TOKEN_LAYOUTS = choices.TOKEN_LAYOUTS
DTYPES = choices.DTYPES
ATTENTIONS = choices.ATTENTIONS  # the transformer layers' attention (see `multi_head_attention`)
# Rematerialisation per transformer layer: "full" saves only its input, "dots" also its matmul outputs.
REMAT_POLICIES = dict(zip(choices.REMATS, (None, jax.checkpoint_policies.nothing_saveable,
                                           jax.checkpoint_policies.dots_with_no_batch_dims_saveable)))
CHOICES = choices.MODEL
# The fields that fix the parameters and the outputs, which a checkpoint must match (checkpoints.py),
# and those free to differ between runs of one model (training-only or numerical settings).
# Together they are the model's config fields (`CONFIG_FIELDS`, below the class; a test checks).
ARCHITECTURE_FIELDS = ("img_size", "patch_size", "embed_dims", "num_heads", "depths", "bits", "mlp_ratio",
                       "interaction", "hash_global", "token_layout")
RUNTIME_FIELDS = ("drop_path_rate", "hash_init_std", "dtype", "param_dtype", "attention", "remat")


def _conv(features, kernel, padding, name, dtype, param_dtype, use_bias=True, strides=1, kernel_init=weight_init):
  return nn.Conv(features, kernel, strides=strides, padding=padding, use_bias=use_bias,
                 kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, name=name)


def _pool_windows(x):
  """The nine (offset (i, j), (B, ceil(H/2), ceil(W/2), C) strided view) of x padded by one -inf, in
  window (row-major) order, and the padded shape."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  ho, wo = (h + 1) // 2, (w + 1) // 2
  return [((i, j), lax.slice(xp, (0, i, j, 0), (b, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1)))
          for i in range(3) for j in range(3)], xp.shape


@jax.custom_vjp
def _max_pool(x):
  """3x3 max pool, stride 2, symmetric padding 1 with -inf (PyTorch), not TF 'SAME'.

  The max of nine strided views, not `reduce_window`, whose gradient (`select_and_scatter`) is slow
  on XLA:CPU (about 4x these views' gradient at the train step's largest pool). The gradient goes to
  the first maximum of each window in row-major order, as `select_and_scatter` and PyTorch route it,
  so ties behave as before.
  """
  return functools.reduce(jnp.maximum, [view for _, view in _pool_windows(x)[0]])


def _max_pool_fwd(x):
  out = _max_pool(x)
  return out, (x, out)


def _max_pool_bwd(res, g):
  x, out = res
  views, padded_shape = _pool_windows(x)
  taken = jnp.zeros(out.shape, bool)
  grad = jnp.zeros(padded_shape, jnp.float32)  # a position can take up to four windows' gradients
  for (i, j), view in views:
    first = (view == out) & ~taken
    taken = taken | first
    # Back to the padded grid: interior padding 1 puts the view's elements at stride 2 from (i, j).
    pads = [(0, 0, 0), (i, padded_shape[1] - i - 2 * out.shape[1] + 1, 1),
            (j, padded_shape[2] - j - 2 * out.shape[2] + 1, 1), (0, 0, 0)]
    grad = grad + lax.pad(jnp.where(first, g, 0).astype(jnp.float32), jnp.float32(0), pads)
  return (grad[:, 1:-1, 1:-1].astype(g.dtype),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _avg_pool(x, k):
  """Average pool with kernel = stride = k, accumulated in float32."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // k, k, w // k, k, c)
  return x.mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


def _bilinear_matrix(n_in: int, factor: int) -> np.ndarray:
  """(n_in * factor, n_in) weights of PyTorch bilinear upsampling with align_corners=False.

  Source coordinates are half-pixel centred and clamped at 0; the right neighbour is
  clamped to the last pixel.
  """
  dst = np.arange(n_in * factor)
  src = np.maximum((dst + 0.5) / factor - 0.5, 0.0)
  i0 = np.floor(src).astype(int)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  m = np.zeros((n_in * factor, n_in))
  np.add.at(m, (dst, i0), 1.0 - frac)
  np.add.at(m, (dst, i1), frac)
  return m


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
  """(B, h, w, C) -> (B, h * factor, w * factor, C), exactly PyTorch's bilinear upsampling."""
  rows = jnp.asarray(_bilinear_matrix(x.shape[1], factor), x.dtype)
  cols = jnp.asarray(_bilinear_matrix(x.shape[2], factor), x.dtype)
  return jnp.einsum("oh,pw,bhwc->bopc", rows, cols, x)


class GlobalAttention(nn.Module):
  """Attention among the pooled tokens of a map, with the reference's token-layout quirk.

  `reference`: the pooled (B, C, h, w) memory read as (B, h*w, C), so token t, feature j is
  element t*C + j of the channel-first map. `spatial`: one token per position. Either way
  the output token t goes back to position t (row-major) before `proj`.
  """
  token_layout: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if self.token_layout == "reference":
      x = x.transpose(0, 3, 1, 2)
    tokens = x.reshape(b, h * w, c)
    pos = self.param("pos_embed_glo", nn.initializers.zeros, (1, h * w, c), self.param_dtype)
    tokens = tokens + pos.astype(tokens.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = multi_head_attention(dense(3 * c, "qkv", use_bias=False, **kw)(tokens), GLOBAL_HEADS)
    return dense(c, "proj", **kw)(y.reshape(b, h, w, c))


class Interaction(nn.Module):
  """Between levels: (3x3 conv [+ global branch]) -> LayerNorm -> 3x3/2 max pool.

  Without the global branch this is NesT's ConvPool.
  """
  features: int
  block: int
  token_layout: str
  use_global: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = _conv(self.features, (3, 3), ((1, 1), (1, 1)), "conv", **kw)(x)
    if self.use_global:
      # Pooling before the bias-free 1x1 conv equals the reference's conv-then-pool
      # (both are linear) at a fraction of the cost.
      g = _conv(self.features, (1, 1), "VALID", "conv_glo", use_bias=False, **kw)(_avg_pool(x, self.block))
      g = GlobalAttention(self.token_layout, name="global_attention", **kw)(g)
      y = y + upsample_bilinear(g, self.block)
    return _max_pool(layer_norm("norm", **kw)(y))


class Level(nn.Module):
  """[Interaction ->] blockify -> + pos embed -> transformer layers -> deblockify."""
  embed_dim: int
  num_heads: int
  block: int
  drop_paths: tuple[float, ...]
  mlp_ratio: float
  pool_kind: str  # "none" (first level) | "conv" (NesT ConvPool) | "interaction"
  token_layout: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "einsum"
  remat: str = "none"

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layer = TransformerLayer
    if self.remat != "none":  # the same params and outputs; `train` (argument 2, after self and x) is static
      layer = nn.remat(TransformerLayer, policy=REMAT_POLICIES[self.remat], static_argnums=(2,))
    if self.pool_kind != "none":
      x = Interaction(self.embed_dim, self.block, self.token_layout, self.pool_kind == "interaction",
                      name="pool", **kw)(x)
    x = blockify(x, self.block)
    pos = self.param("pos_embed", weight_init, (1,) + x.shape[1:], self.param_dtype)
    x = x + pos.astype(x.dtype)
    for j, rate in enumerate(self.drop_paths):
      x = layer(self.num_heads, self.mlp_ratio, rate, name=f"transformer_encoder_{j}", attention=self.attention,
                **kw)(x, train)
    return deblockify(x, self.block)


class HashLayer(nn.Module):
  """(1x3 conv -> 3x1 conv [+ global branch]) -> 3x3/2 max pool -> 1x1 conv -> mean -> tanh."""
  bits: int
  token_layout: str
  use_global: bool
  init_std: float = 0.02  # the code conv's N(0, std) init; the reference's 0.02 starts codes near 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c, side = x.shape[-1], x.shape[1]
    y = _conv(c, (1, 3), ((0, 0), (1, 1)), "convS1", **kw)(x)
    y = _conv(c, (3, 1), ((1, 1), (0, 0)), "convS2", **kw)(y)
    if self.use_global:
      g = GlobalAttention(self.token_layout, name="global_attention", **kw)(_avg_pool(x, side))
      y = y + upsample_bilinear(g, side)
    y = _max_pool(y)
    # Global mean before the 1x1 conv equals the reference's conv-then-mean (affine map).
    y = y.mean(axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(y.dtype)
    y = _conv(self.bits, (1, 1), "VALID", "conv2", **kw, kernel_init=nn.initializers.normal(self.init_std))(y)
    return jnp.tanh(y.reshape(y.shape[0], self.bits).astype(jnp.float32))


class PatchEmbed(nn.Module):
  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    return _conv(self.embed_dim, (p, p), "VALID", "proj", self.dtype, self.param_dtype, strides=p)(x)


class HybridHash(nn.Module):
  """Image (B, H, W, 3) -> tanh codes (B, bits) in float32.

  `apply(..., train=True)` enables stochastic depth (rng collection 'dropout');
  `return_features=True` also returns the final-norm map (B, b, b, C_last) in float32.
  """
  img_size: int = 224
  patch_size: int = 4
  embed_dims: Sequence[int] = (128, 256, 512)
  num_heads: Sequence[int] = (4, 8, 16)
  depths: Sequence[int] = (2, 2, 15)
  bits: int = 64
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.5
  token_layout: str = "reference"
  interaction: bool = True
  hash_global: bool = True
  hash_init_std: float = 0.02
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  attention: str = "einsum"  # ATTENTIONS; neither this nor remat changes params or outputs
  remat: str = "none"  # a key of REMAT_POLICIES

  def __post_init__(self):
    _validate(self)
    super().__post_init__()

  @property
  def grid(self) -> int:
    return self.img_size // self.patch_size

  @property
  def block(self) -> int:
    return self.grid // 2 ** (len(self.depths) - 1)

  @nn.compact
  def __call__(self, images, train: bool = False, return_features: bool = False):
    kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    x = PatchEmbed(self.embed_dims[0], self.patch_size, name="patch_embed", **kw)(images.astype(kw["dtype"]))
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    start = 0
    for i, (dim, heads, depth) in enumerate(zip(self.embed_dims, self.num_heads, self.depths)):
      pool = "none" if i == 0 else ("interaction" if self.interaction else "conv")
      x = Level(dim, heads, self.block, tuple(rates[start:start + depth]), self.mlp_ratio, pool,
                self.token_layout, name=f"levels_{i}", attention=self.attention, remat=self.remat, **kw)(x, train)
      start += depth
    features = layer_norm("norm", **kw)(x)
    codes = HashLayer(self.bits, self.token_layout, self.hash_global, self.hash_init_std, name="hashlayer",
                      **kw)(features)
    if return_features:
      return codes, features.astype(jnp.float32)
    return codes


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(HybridHash) if f.name not in ("parent", "name"))


def _validate(m: HybridHash) -> None:
  """Raises ValueError naming the field, before anything is traced."""
  n = len(m.depths)
  if n < 1 or len(m.embed_dims) != n or len(m.num_heads) != n:
    raise errors.ConfigError(f"embed_dims {tuple(m.embed_dims)}, num_heads {tuple(m.num_heads)} and depths "
                     f"{tuple(m.depths)} must have the same, non-zero length")
  if m.patch_size < 1 or m.img_size % m.patch_size:
    raise errors.ConfigError(f"img_size {m.img_size} must be a multiple of patch_size {m.patch_size}")
  grid, div = m.img_size // m.patch_size, 2 ** (n - 1)
  if grid < div or grid % div:
    raise errors.ConfigError(f"img_size / patch_size = {grid} must be a positive multiple of {div} "
                     f"(2**(len(depths)-1)), so every level has whole blocks")
  for i, (dim, heads) in enumerate(zip(m.embed_dims, m.num_heads)):
    if heads < 1 or dim % heads:
      raise errors.ConfigError(f"embed_dims[{i}] = {dim} must be divisible by num_heads[{i}] = {heads}")
  global_dims = {i: m.embed_dims[i] for i in range(1, n) if m.interaction}
  if m.hash_global:
    global_dims[n - 1] = m.embed_dims[-1]
  for i, dim in global_dims.items():
    if dim % GLOBAL_HEADS:
      raise errors.ConfigError(f"embed_dims[{i}] = {dim} feeds a global attention with {GLOBAL_HEADS} heads, "
                       f"so it must be divisible by {GLOBAL_HEADS}")
  if any(d < 1 for d in m.depths):
    raise errors.ConfigError(f"depths {tuple(m.depths)} must all be >= 1")
  if m.bits < 1:
    raise errors.ConfigError(f"bits = {m.bits} must be >= 1")
  for field, allowed in CHOICES.items():
    if getattr(m, field) not in allowed:
      raise errors.ConfigError(f"{field} = {getattr(m, field)!r} must be one of {allowed}")
  if not 0.0 <= m.drop_path_rate < 1.0:
    raise errors.ConfigError(f"drop_path_rate = {m.drop_path_rate} must be in [0, 1)")
  if not m.hash_init_std > 0:
    raise errors.ConfigError(f"hash_init_std = {m.hash_init_std} must be > 0")
  if m.mlp_ratio <= 0:
    raise errors.ConfigError(f"mlp_ratio = {m.mlp_ratio} must be > 0")
  if m.attention == "cudnn" and (jax.default_backend() != "gpu" or jnp.dtype(m.dtype) == jnp.float32):
    raise errors.ConfigError(f"attention = 'cudnn' needs a GPU and dtype bfloat16 or float16 (backend "
                             f"{jax.default_backend()}, dtype {jnp.dtype(m.dtype).name}); use 'xla' or 'einsum'")


def from_config(model_cfg: Mapping[str, Any]) -> HybridHash:
  """Builds the model from `config_lib.base_config().model` (a ConfigDict or dict)."""
  cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  unknown = sorted(set(cfg) - set(CONFIG_FIELDS))
  if unknown:
    raise errors.ConfigError(f"unknown model config fields {unknown}; known: {CONFIG_FIELDS}")
  for k in ("embed_dims", "num_heads", "depths"):
    if k in cfg:
      cfg[k] = tuple(cfg[k])
  return HybridHash(**cfg)


def for_host(model_cfg: Mapping[str, Any], platform: str) -> dict[str, Any]:
  """A saved model config with its runtime fields set for a reader (evaluation only) on `platform`.

  Runtime fields are not bound to a checkpoint, so a model trained with `attention="cudnn"` on a GPU
  must still encode on a CPU. A reader never takes a gradient (remat "none"); on a CPU it computes in
  float32, which XLA:CPU runs faster than bfloat16; cuDNN attention becomes "xla" (the same attention)
  wherever it cannot run. `platform` is "cpu", "gpu" or "tpu" (`sharding.platform`).
  """
  cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg, remat="none")
  if platform == "cpu":
    cfg["dtype"] = "float32"
  if cfg.get("attention") == "cudnn" and (platform != "gpu" or jnp.dtype(cfg.get("dtype", "float32")) == jnp.float32):
    cfg["attention"] = "xla"
  return cfg


def abstract_params(model: HybridHash) -> Any:
  """The param tree's shapes and dtypes, without allocating."""
  images = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]


def model_config(model: HybridHash) -> dict[str, Any]:
  """The model's fields as plain values, to store with a checkpoint."""
  out = {f: getattr(model, f) for f in CONFIG_FIELDS}
  for k in ("embed_dims", "num_heads", "depths"):
    out[k] = list(out[k])
  for k in ("dtype", "param_dtype"):
    out[k] = jnp.dtype(out[k]).name
  return out


def hybridhash_paper(bits: int = 64, **overrides) -> HybridHash:
  """The paper's model: 224 px, patch 4, widths (128, 256, 512), depths (2, 2, 15)."""
  return HybridHash(bits=bits, **overrides)


def hybridhash_tiny112(bits: int = 32, **overrides) -> HybridHash:
  """The golden parity configuration: 112 px, patch 2 (b = 14), widths (16, 32, 64)."""
  kw = dict(img_size=112, patch_size=2, embed_dims=(16, 32, 64), num_heads=(2, 4, 8), depths=(1, 1, 2))
  return HybridHash(bits=bits, **{**kw, **overrides})


def hybridhash_tiny32(bits: int = 16, **overrides) -> HybridHash:
  """A CPU-sized model for 32x32 images: patch 2, G = 16, b = 4."""
  kw = dict(img_size=32, patch_size=2, embed_dims=(16, 32, 64), num_heads=(2, 4, 8), depths=(1, 1, 2),
            drop_path_rate=0.1)
  return HybridHash(bits=bits, **{**kw, **overrides})


PRESETS = {"paper": hybridhash_paper, "tiny112": hybridhash_tiny112, "tiny32": hybridhash_tiny32}
