"""Weight import: reference/timm PyTorch state dicts and the official NesT Flax checkpoint.

Names. A Flax path maps to the reference's PyTorch name by joining with '.', writing
`levels_i` / `transformer_encoder_j` as `levels.i` / `transformer_encoder.j`, `hashlayer` as
`hashlayer_train`, and `kernel` / `scale` as `weight`:
  levels_1/pool/global_attention/qkv/kernel  <->  levels.1.pool.global_attention.qkv.weight
Layouts. Conv weights (O, I, kh, kw) <-> kernels (kh, kw, I, O); Linear weights (O, I) <-> (I, O).
Attention needs no reordering: our qkv features are (q|k|v, head, dim) and heads merge
head-minor, exactly as in the reference. The reference's unused `FcLayer.*` is ignored.

Modes. `strict` wants exactly the model's tensors. `nest` loads what the paper loads from
timm's NesT-B (`nest_base_jx.goog_in1k`): every tensor whose name the model shares (patch
embedding, position embeddings, the level layers both have, the final norm, and NesT's
`levels.{1,2}.pool.conv/norm` into the interaction modules), logs what it skipped (deeper
level-2 layers, the head) and what kept its init, and takes the rest from `init_params`.

`.pth` files are never unpickled here. Convert one once with torch:
  python -c "import sys,torch,safetensors.torch as st; st.save_file({k: v.contiguous() for k, v in \
    torch.load(sys.argv[1], map_location='cpu', weights_only=True).items()}, sys.argv[2])" in.pth out.safetensors

CLI (writes a params-only orbax checkpoint that evaluation and `init_checkpoint` read):
  python -m hybridhash_jax.convert --source nest_base.safetensors --format torch --mode nest \
      [--config configs/imagenet.py | --preset paper --bits 64] --output /tmp/nest_b_init
"""

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import serialization, traverse_util
from ml_collections import config_flags
from safetensors.numpy import load_file

from hybridhash_jax import checkpoints
from hybridhash_jax import cli
from hybridhash_jax import errors
from hybridhash_jax.models import PRESETS, HybridHash, abstract_params, from_config, model_config

IGNORED_PREFIX = "FcLayer."
_RENAMES = {"hashlayer": "hashlayer_train", "kernel": "weight", "scale": "weight"}


def torch_name(path: tuple[str, ...]) -> str:
  parts = []
  for p in path:
    m = re.fullmatch(r"(levels|transformer_encoder)_(\d+)", p)
    parts += [m.group(1), m.group(2)] if m else [_RENAMES.get(p, p)]
  return ".".join(parts)


def _to_torch_layout(leaf: str, a):
  if leaf != "kernel":
    return a
  return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T


def _from_torch_layout(leaf: str, a):
  if leaf != "kernel":
    return a
  return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T


def to_torch_state_dict(params: Any, model: HybridHash) -> dict[str, np.ndarray]:
  """Params -> reference-named PyTorch-layout arrays (for export and round trips)."""
  del model  # the names follow from the tree alone; kept for a symmetric signature
  # Contiguous copies: safetensors' numpy writer saves raw memory and ignores strides.
  return {torch_name(p): np.ascontiguousarray(_to_torch_layout(p[-1], np.asarray(v)))
          for p, v in traverse_util.flatten_dict(params).items()}


@dataclasses.dataclass
class ImportReport:
  loaded: list[str]
  kept_init: list[str]  # model tensors the file lacks (nest mode)
  skipped: list[str]  # file tensors the model lacks (nest mode)
  ignored: list[str]  # FcLayer.*

  def log(self) -> None:
    logging.info("loaded %d tensors", len(self.loaded))
    if self.ignored:
      logging.info("ignored the reference's unused %s", ", ".join(self.ignored))
    if self.skipped:
      logging.info("skipped %d tensors the model lacks: %s", len(self.skipped), ", ".join(self.skipped))
    if self.kept_init:
      logging.info("%d tensors keep their init: %s", len(self.kept_init), ", ".join(self.kept_init))


def import_state_dict(state_dict: Mapping[str, np.ndarray], model: HybridHash, mode: str = "strict",
                      init_params: Any = None) -> tuple[Any, ImportReport]:
  """Maps a reference/timm-named state dict onto the model's params; see the module doc."""
  if mode not in ("strict", "nest"):
    raise ValueError(f"mode {mode!r} must be 'strict' or 'nest'")
  if mode == "nest" and init_params is None:
    raise ValueError("mode='nest' needs init_params for the tensors NesT does not have")
  wanted = {torch_name(p): (p, a) for p, a in traverse_util.flatten_dict(abstract_params(model)).items()}
  ignored = sorted(k for k in state_dict if k.startswith(IGNORED_PREFIX))
  names = set(state_dict) - set(ignored)
  missing, unexpected = sorted(set(wanted) - names), sorted(names - set(wanted))
  misshaped = []
  for k in sorted(names & set(wanted)):
    path, a = wanted[k]
    want = _to_torch_layout(path[-1], np.empty(a.shape, np.bool_)).shape
    if tuple(state_dict[k].shape) != want:
      misshaped.append(f"{k}: file has {tuple(state_dict[k].shape)}, model wants {want}")
  problems = [("mis-shaped", misshaped)]
  if mode == "strict":
    problems = [("missing", missing), ("unexpected", unexpected)] + problems
  problems = [f"{what} ({len(v)}):\n    " + "\n    ".join(_first(v)) for what, v in problems if v]
  if problems:
    raise errors.DataError(f"state dict does not fit the model ({mode} mode):\n  " + "\n  ".join(problems))

  init_flat = traverse_util.flatten_dict(init_params) if init_params is not None else {}
  flat = {}
  for k, (path, a) in wanted.items():
    if k in names:
      flat[path] = jnp.asarray(_from_torch_layout(path[-1], np.asarray(state_dict[k])), a.dtype)
    else:
      flat[path] = init_flat[path]
  report = ImportReport(loaded=sorted(names & set(wanted)), kept_init=missing, skipped=unexpected,
                        ignored=ignored)
  return traverse_util.unflatten_dict(flat), report


def _first(names: list[str], n: int = 25) -> list[str]:
  return names if len(names) <= n else names[:n] + [f"... and {len(names) - n} more"]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  if not str(path).endswith(".safetensors"):
    raise errors.DataError(f"{path}: only .safetensors is read (a .pth is a pickle); convert it first, "
                           "see the hybridhash_jax.convert module docstring for the one-liner")
  if not os.path.isfile(path):
    raise errors.NotFoundError(f"--source={path}: no such file")
  return load_file(path)


def load_torch_weights(path: str, model: HybridHash, mode: str = "strict", init_params: Any = None) -> Any:
  """Reads a reference/timm `.safetensors` state dict into params (see the module doc)."""
  params, report = import_state_dict(read_state_dict(path), model, mode, init_params)
  report.log()
  return params


def nest_flax_to_state_dict(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Official NesT Flax params (`["optimizer"]["target"]`) -> timm-named PyTorch-layout arrays.

  Attention: `DenseGeneral_0` (query) kernel (C, H, d) flattens to output feature h*d + k, the
  q third of our qkv; `DenseGeneral_1` (C, H, 2d) holds per head the key ([..., :d]) and then
  the value ([..., d:]). `proj_kernel` (H, d, C) contracts over (head, dim); our proj input is
  merged head-minor (channel k*H + h), so its rows are proj_kernel transposed to (d, H, C).
  EncoderNDBlock_k are numbered across levels; a block's level is the one of its width.
  """
  t = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
  widths = []
  while f"PositionEmbedding_{len(widths)}/pos_embedding" in t:
    widths.append(t[f"PositionEmbedding_{len(widths)}/pos_embedding"].shape[-1])
  conv = lambda k: k.transpose(3, 2, 0, 1)
  sd = {"patch_embed.proj.weight": conv(t["PatchEmbedding_0/Conv_0/kernel"]),
        "patch_embed.proj.bias": t["PatchEmbedding_0/Conv_0/bias"],
        "norm.weight": t["LayerNorm_0/scale"], "norm.bias": t["LayerNorm_0/bias"]}
  if "Dense_0/kernel" in t:
    sd.update({"head.weight": t["Dense_0/kernel"].T, "head.bias": t["Dense_0/bias"]})
  for i, _ in enumerate(widths):
    sd[f"levels.{i}.pos_embed"] = t[f"PositionEmbedding_{i}/pos_embedding"]
  for i in range(len(widths) - 1):
    p, q = f"ConvPool_{i}/", f"levels.{i + 1}.pool."
    sd.update({q + "conv.weight": conv(t[p + "Conv_0/kernel"]), q + "conv.bias": t[p + "Conv_0/bias"],
               q + "norm.weight": t[p + "LayerNorm_0/scale"], q + "norm.bias": t[p + "LayerNorm_0/bias"]})
  layer_in_level = [0] * len(widths)
  k = 0
  while f"EncoderNDBlock_{k}/LayerNorm_0/scale" in t:
    p = f"EncoderNDBlock_{k}/"
    c = t[p + "LayerNorm_0/scale"].shape[0]
    if c not in widths:
      raise errors.DataError(f"EncoderNDBlock_{k} has width {c}, which no PositionEmbedding has ({widths})")
    level = widths.index(c)
    q = f"levels.{level}.transformer_encoder.{layer_in_level[level]}."
    layer_in_level[level] += 1
    a, m = p + "MultiHeadAttention_0/", p + "MlpBlock_0/"
    wq, wkv = t[a + "DenseGeneral_0/kernel"], t[a + "DenseGeneral_1/kernel"]
    bq, bkv = t[a + "DenseGeneral_0/bias"], t[a + "DenseGeneral_1/bias"]
    d = wq.shape[-1]
    qkv_kernel = np.concatenate([w.reshape(c, c) for w in (wq, wkv[..., :d], wkv[..., d:])], axis=1)
    qkv_bias = np.concatenate([b.reshape(c) for b in (bq, bkv[..., :d], bkv[..., d:])])
    proj_kernel = t[a + "proj_kernel"].transpose(1, 0, 2).reshape(c, c)
    sd.update({
        q + "norm1.weight": t[p + "LayerNorm_0/scale"], q + "norm1.bias": t[p + "LayerNorm_0/bias"],
        q + "attn.qkv.weight": qkv_kernel.T, q + "attn.qkv.bias": qkv_bias,
        q + "attn.proj.weight": proj_kernel.T, q + "attn.proj.bias": t[a + "bias"],
        q + "norm2.weight": t[p + "LayerNorm_1/scale"], q + "norm2.bias": t[p + "LayerNorm_1/bias"],
        q + "mlp.fc1.weight": t[m + "Dense_0/kernel"].T, q + "mlp.fc1.bias": t[m + "Dense_0/bias"],
        q + "mlp.fc2.weight": t[m + "Dense_1/kernel"].T, q + "mlp.fc2.bias": t[m + "Dense_1/bias"],
    })
    k += 1
  return sd


def load_nest_flax_checkpoint(path: str, model: HybridHash, init_params: Any) -> Any:
  """Loads the official NesT Flax msgpack checkpoint as `nest` mode does timm's weights."""
  if not os.path.isfile(path):
    raise errors.NotFoundError(f"--source={path}: no such file")
  with open(path, "rb") as f:
    restored = serialization.msgpack_restore(f.read())
  try:
    tree = restored["optimizer"]["target"]
  except (KeyError, TypeError) as e:
    raise errors.DataError(f"{path}: no ['optimizer']['target'] params in this msgpack checkpoint") from e
  params, report = import_state_dict(nest_flax_to_state_dict(tree), model, "nest", init_params)
  report.log()
  return params


def _define_flags() -> None:
  """Defined only when run as a script, so importing this module adds no global flags."""
  flags.DEFINE_string("source", None, "Weights: .safetensors (torch) or .msgpack (nest_flax).")
  flags.DEFINE_enum("format", "torch", ["torch", "nest_flax"], "Source format.")
  flags.DEFINE_enum("mode", "strict", ["strict", "nest"], "torch format: strict, or the NesT-B import.")
  flags.DEFINE_enum("preset", "paper", sorted(PRESETS), "Model when no --config is given.")
  flags.DEFINE_integer("bits", None, "Code length for --preset (default: the preset's).")
  flags.DEFINE_string("output", None, "Checkpoint directory to write.")
  flags.DEFINE_integer("seed", 0, "Init seed for the tensors the source lacks.")
  config_flags.DEFINE_config_file("config", None, "Experiment config; its `model` is used.")
  flags.DEFINE_enum("log_level", "warning", cli.LOG_LEVELS, cli.LOG_LEVEL_HELP)
  flags.mark_flags_as_required(["source", "output"])


def main(argv):
  del argv
  with cli.console(flags.FLAGS.log_level):
    _convert(flags.FLAGS)


def _convert(f) -> None:
  if f.config is not None:
    model = from_config(f.config.model)
  else:
    model = PRESETS[f.preset](**({} if f.bits is None else {"bits": f.bits}))
  init_params = None
  if f.format == "nest_flax" or f.mode == "nest":
    images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
    init_params = jax.jit(model.init)(jax.random.key(f.seed), images)["params"]
  if f.format == "nest_flax":
    params = load_nest_flax_checkpoint(f.source, model, init_params)
  else:
    params = load_torch_weights(f.source, model, f.mode, init_params)
  checkpoints.save_params(f.output, params, {"model": model_config(model)})
  print(f"wrote {f.output}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
