"""Tiny NesT-shaped weights in timm naming, and their official-Flax-tree counterpart.

`state_dict_to_nest_flax` inverts `convert.nest_flax_to_state_dict` from first principles
(the official layouts, docs/training.md), so a generated msgpack can be checked end to end.
"""

import numpy as np


def nest_shapes(img_size, patch_size, embed_dims, depths, mlp_ratio=4, num_classes=1000):
  """Name -> shape of a timm NesT state dict (classifier head included)."""
  levels = len(depths)
  block = img_size // patch_size // 2 ** (levels - 1)
  s = {"patch_embed.proj.weight": (embed_dims[0], 3, patch_size, patch_size),
       "patch_embed.proj.bias": (embed_dims[0],)}
  for i, (c, depth) in enumerate(zip(embed_dims, depths)):
    s[f"levels.{i}.pos_embed"] = (1, 4 ** (levels - 1 - i), block * block, c)
    if i:
      s.update({f"levels.{i}.pool.conv.weight": (c, embed_dims[i - 1], 3, 3), f"levels.{i}.pool.conv.bias": (c,),
                f"levels.{i}.pool.norm.weight": (c,), f"levels.{i}.pool.norm.bias": (c,)})
    h = int(c * mlp_ratio)
    for j in range(depth):
      p = f"levels.{i}.transformer_encoder.{j}."
      s.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                p + "mlp.fc1.weight": (h, c), p + "mlp.fc1.bias": (h,),
                p + "mlp.fc2.weight": (c, h), p + "mlp.fc2.bias": (c,)})
  s.update({"norm.weight": (embed_dims[-1],), "norm.bias": (embed_dims[-1],),
            "head.weight": (num_classes, embed_dims[-1]), "head.bias": (num_classes,)})
  return s


def nest_state_dict(seed, **shape_kw):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(0, 0.5, v).astype(np.float32) for k, v in nest_shapes(**shape_kw).items()}


def state_dict_to_nest_flax(sd, num_heads, depths):
  """timm-named NesT weights -> the official Flax params tree (nested dicts)."""
  conv = lambda w: w.transpose(2, 3, 1, 0)
  ln = lambda p: {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}
  dense = lambda p: {"kernel": sd[p + ".weight"].T, "bias": sd[p + ".bias"]}
  tree = {"PatchEmbedding_0": {"Conv_0": {"kernel": conv(sd["patch_embed.proj.weight"]),
                                          "bias": sd["patch_embed.proj.bias"]}},
          "LayerNorm_0": ln("norm"), "Dense_0": dense("head")}
  block = 0
  for i, (heads, depth) in enumerate(zip(num_heads, depths)):
    tree[f"PositionEmbedding_{i}"] = {"pos_embedding": sd[f"levels.{i}.pos_embed"]}
    if i:
      tree[f"ConvPool_{i - 1}"] = {
          "Conv_0": {"kernel": conv(sd[f"levels.{i}.pool.conv.weight"]), "bias": sd[f"levels.{i}.pool.conv.bias"]},
          "LayerNorm_0": ln(f"levels.{i}.pool.norm")}
    for j in range(depth):
      p = f"levels.{i}.transformer_encoder.{j}."
      w, b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]  # rows: (q|k|v, head, dim)
      c = w.shape[1]
      d = c // heads
      wq, wk, wv = (w[s * c:(s + 1) * c].T.reshape(c, heads, d) for s in range(3))
      bq, bk, bv = (b[s * c:(s + 1) * c].reshape(heads, d) for s in range(3))
      # proj input channel is k * heads + h (head-minor); official proj_kernel is (head, dim, out).
      proj = sd[p + "attn.proj.weight"].T.reshape(d, heads, c).transpose(1, 0, 2)
      tree[f"EncoderNDBlock_{block}"] = {
          "LayerNorm_0": ln(p + "norm1"), "LayerNorm_1": ln(p + "norm2"),
          "MultiHeadAttention_0": {
              "DenseGeneral_0": {"kernel": wq, "bias": bq},
              "DenseGeneral_1": {"kernel": np.concatenate([wk, wv], -1), "bias": np.concatenate([bk, bv], -1)},
              "proj_kernel": proj, "bias": sd[p + "attn.proj.bias"]},
          "MlpBlock_0": {"Dense_0": dense(p + "mlp.fc1"), "Dense_1": dense(p + "mlp.fc2")}}
      block += 1
  return tree
