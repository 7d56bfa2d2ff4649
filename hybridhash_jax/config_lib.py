"""The one schema every config file fills in, and its early validation.

Config files under `configs/` start from `base_config()` and override fields, so a
misspelt key fails under `lock_config=True` and every run has the same fields.
"""

import ml_collections

from hybridhash_jax import choices
from hybridhash_jax import errors

PAPER_MODEL = dict(
    img_size=224,
    patch_size=4,
    embed_dims=(128, 256, 512),
    num_heads=(4, 8, 16),
    depths=(2, 2, 15),
    mlp_ratio=4.0,
    drop_path_rate=0.5,
)


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the paper's model and optimiser; the data fields are set per dataset."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      **PAPER_MODEL,
      bits=64,
      token_layout="reference",  # "reference" reproduces the global-attention quirk; "spatial" is the clean form.
      interaction=True,  # False: NesT's plain conv-LN-maxpool between levels.
      hash_global=True,  # False: the hash layer without its global-attention branch.
      hash_init_std=0.02,  # std of the hash layer's last conv at init: the reference's 0.02 starts codes near 0.
      dtype="float32",  # compute dtype; "bfloat16" on accelerators.
      param_dtype="float32",
      attention="einsum",  # "xla" | "cudnn" (GPU, bfloat16): jax.nn.dot_product_attention; same outputs.
      remat="none",  # "full" | "dots": recompute each transformer layer in the backward pass; same outputs.
  ))

  c.data = ml_collections.ConfigDict(dict(
      name="cifar10",  # cifar10 | listfile | folder | digits
      protocol="cifar10",  # cifar10 protocols: cifar10 | cifar10-1 | cifar10-2
      source="tfds",  # cifar10: tfds | archive
      root="",  # images (listfile, folder) or the CIFAR-10 archive folder
      list_dir="",  # listfile: folder holding train.txt, test.txt, database.txt
      tfds_data_dir="",
      num_classes=10,
      top_k=-1,  # mAP@K; -1 means the whole database
      split_seed=0,
      query_per_class=100,  # folder datasets
      train_per_class=500,  # folder datasets
      on_bad_image="error",  # error | skip
      check_images=True,  # decode every file of every split before the first step
      num_workers=2,
      prefetch_buffer_size=2,
  ))

  c.loss = ml_collections.ConfigDict(dict(
      alpha=0.5,
      memory_bank_size=-1,  # -1: the training-set size; 10000 reproduces the reference's CIFAR quirk.
      # From-scratch recipe (configs without NesT-B); the defaults are the paper's.
      bank_init="zeros",  # zeros (paper) | codes: the model's own codes of the training set before step 1
      quantization_weight=0.0,  # > 0 adds this times mean((|u| - 1)^2) to the loss; 0 in the paper
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="rmsprop",  # rmsprop (PyTorch semantics) | adamw
      learning_rate=2.5e-5,
      weight_decay=1e-5,
      rmsprop_decay=0.99,
      eps=1e-8,
      schedule="constant",  # constant | warmup_cosine
      warmup_steps=0,
  ))

  c.batch_size = 64  # global batch
  c.eval_batch_size = 128
  c.num_epochs = 12
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.eval_every_epochs = 3
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.init_checkpoint = ""  # params only, e.g. converted NesT-B weights
  c.eval_only = False
  c.eval_step = -1  # eval_only: -1 restores the latest checkpoint
  # data=-1: all devices left over. With fsdp > 1, leaves of fsdp_min_size or more elements are split
  # over the fsdp axis; smaller ones stay replicated (splitting them costs more than it saves).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**16))
  return c


def from_scratch(c: ml_collections.ConfigDict) -> None:
  """The recipe of every config that does not start from NesT-B weights: out of the WMLE saddle on purpose.

  A fresh model's codes start near 0 and nearly equal, with a zero bank: theta ~ 0, a stationary
  point of WMLE that only noise leaves. The bank starts with the model's own codes (a gradient from
  step 1), the hash layer's last conv starts 4x wider than the reference's 0.02 (codes that differ
  from the start), and AdamW takes steps of a steady size (the PyTorch RMSprop's first steps are
  ~10x the learning rate, which from scratch saturates every code), decaying to 0 on a cosine so
  that the last epochs settle the codes. docs/training.md, "From scratch", gives what was measured.
  """
  c.loss.bank_init = "codes"
  c.model.hash_init_std = 0.08
  c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="warmup_cosine", warmup_steps=0)


_CHOICES = {
    **{f"model.{k}": v for k, v in choices.MODEL.items()},
    "optimizer.name": choices.OPTIMIZERS,
    "optimizer.schedule": choices.SCHEDULES,
    "loss.bank_init": ("zeros", "codes"),
}
_POSITIVE = ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "model.bits", "optimizer.learning_rate", "loss.alpha")


def _get(config, dotted: str):
  for key in dotted.split("."):
    config = config[key]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, on values no run can use.

  The model checks its own shapes and `input_pipeline.validate` the `data` fields.
  """
  for field, allowed in _CHOICES.items():
    if _get(config, field) not in allowed:
      raise errors.ConfigError(f"config.{field}={_get(config, field)!r} is not one of {allowed}")
  for field in _POSITIVE:
    if not _get(config, field) > 0:
      raise errors.ConfigError(f"config.{field}={_get(config, field)!r} must be > 0")
  if not config.loss.quantization_weight >= 0:
    raise errors.ConfigError(f"config.loss.quantization_weight={config.loss.quantization_weight!r} must be >= 0")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise errors.ConfigError("config.num_epochs must be > 0 (or set config.num_train_steps)")


def validate_training(config: ml_collections.ConfigDict) -> None:
  """`validate`, and what only training needs."""
  validate(config)
  if config.model.param_dtype != "float32":
    raise errors.ConfigError(
        f"config.model.param_dtype={config.model.param_dtype!r} cannot train: no float32 master copy of the "
        f"params is kept, and {config.optimizer.name} updates near optimizer.learning_rate="
        f"{config.optimizer.learning_rate:g} are below bfloat16's resolution (~0.4% of a param), so they round "
        "away. Train with param_dtype='float32' (model.dtype='bfloat16' still computes in bfloat16); bfloat16 "
        "params are for evaluation and export.")
