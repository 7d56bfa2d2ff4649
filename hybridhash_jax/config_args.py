"""big_vision-style config arguments: `configs/cifar10.py:bits=32,protocol=cifar10-1,runlocal`.

`config_flags` hands the text after ':' to `get_config(arg)`. Each config file declares the
keys it accepts (a default, and the allowed values where they are few) and `parse` checks the
text against them, so a typo fails at once with a message naming the key and the value.
A bare key (`runlocal`) means True. The arguments every dataset shares -- bits, the tiny CPU
variant and the ablation switches -- are declared and applied here, once, and so is the config
of the four list-file datasets, which differ only in their protocol preset.
"""

import dataclasses
import importlib.util
import os
import types
from typing import Any

import ml_collections

from hybridhash_jax import choices
from hybridhash_jax import config_lib
from hybridhash_jax import errors
from hybridhash_jax.data import listfile

BITS = (16, 32, 48, 64)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclasses.dataclass(frozen=True)
class Arg:
  """One accepted key: its default (whose type is the key's type) and, optionally, its allowed values."""
  default: Any
  choices: tuple = ()


def load_module(path: str) -> types.ModuleType:
  """Imports a config file by path, as `config_flags` does (so scripts and notebooks need no flags)."""
  if not os.path.isfile(path):
    raise errors.NotFoundError(f"config file {path!r} not found")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"{name}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(path_and_arg: str) -> ml_collections.ConfigDict:
  """`"configs/cifar10.py:bits=32"` -> `get_config("bits=32")` of that file, locked like `config_flags` does."""
  path, *arg = path_and_arg.split(":", 1)  # no ':' calls get_config() with no argument, as config_flags does
  config = load_module(path).get_config(*arg)
  config.lock()  # a misspelt field then fails instead of adding a new one
  return config


def common_args() -> dict[str, Arg]:
  """Keys every dataset config accepts (see `apply_common`)."""
  return dict(
      bits=Arg(64, BITS),
      runlocal=Arg(False),
      token_layout=Arg("reference", choices.TOKEN_LAYOUTS),
      interaction=Arg(True),
      hash_global=Arg(True),
      memory_bank_size=Arg(-1),
      optimizer=Arg("auto", ("auto", *choices.OPTIMIZERS)),  # auto: rmsprop, adamw with runlocal
      dtype=Arg("auto", ("auto", *choices.DTYPES)),  # auto: bfloat16, float32 with runlocal
  )


def _convert(key: str, text: str, default: Any) -> Any:
  kind = type(default)
  if kind is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise errors.ConfigError(f"{key} must be True or False, got {text!r}")
  if kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      raise errors.ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
  return text


def parse(arg: str | None, spec: dict[str, Arg], where: str = "config") -> ml_collections.ConfigDict:
  """`"k=v,flag"` -> a ConfigDict holding every key of `spec`, defaults filled in.

  Raises ValueError naming `where` and the offending key or value.
  """
  values = {k: a.default for k, a in spec.items()}
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, text = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise errors.ConfigError(f"{where}: unknown argument {key!r}; known: {', '.join(spec)}")
    a = spec[key]
    if not eq:
      if type(a.default) is not bool:
        raise errors.ConfigError(f"{where}: argument {key!r} needs a value ({key}=...)")
      text = "true"
    try:
      value = _convert(key, text.strip(), a.default)
    except ValueError as e:
      raise errors.ConfigError(f"{where}: {e}") from None
    if a.choices and value not in a.choices:
      raise errors.ConfigError(f"{where}: {key} must be one of {', '.join(map(str, a.choices))}, got {text.strip()!r}")
    values[key] = value
  return ml_collections.ConfigDict(values)


def apply_common(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
  """Sets bits, the ablation switches and, with `runlocal`, a tiny model and run that fit a CPU, trained
  with the from-scratch recipe (`config_lib.from_scratch`).

  The compute dtype defaults to bfloat16 (TPU/GPU), but to float32 with `runlocal`: CPUs emulate
  bfloat16 matmuls, slowly.
  """
  dtype = ("float32" if args.runlocal else "bfloat16") if args.dtype == "auto" else args.dtype
  c.model.update(bits=args.bits, token_layout=args.token_layout, interaction=args.interaction,
                 hash_global=args.hash_global, dtype=dtype)
  c.loss.memory_bank_size = args.memory_bank_size
  if args.runlocal:
    c.model.update(img_size=32, patch_size=2, embed_dims=(16, 32, 64), num_heads=(2, 4, 8), depths=(1, 1, 1),
                   drop_path_rate=0.1)
    c.batch_size = 16
    c.eval_batch_size = 256
    c.num_train_steps = 20
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.data.num_workers = 0
    config_lib.from_scratch(c)
  if args.optimizer != "auto":
    c.optimizer.name = args.optimizer


def listfile_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  """A list-file dataset (`listfile.PRESETS[dataset]`) with the paper's model and ImageNet-100 schedule."""
  args = parse(arg, common_args(), where=f"configs/{dataset}.py")
  preset = listfile.PRESETS[dataset]
  c = config_lib.base_config()
  c.data.update(name="listfile", num_classes=preset["num_classes"], top_k=preset["top_k"],
                list_dir=f"data/{dataset}", root=f"data/{dataset}")
  c.num_epochs, c.eval_every_epochs = 12, 3  # the reference's ImageNet-100 log
  apply_common(c, args)
  return c
