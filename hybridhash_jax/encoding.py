"""The one restore-and-encode path: a checkpoint's params on the devices, and a jitted, batch-sharded encode.

Evaluation, `index`, `export` and the web server all encode through here, so an image gets the
same code whichever of them asks. `restore` rebuilds the model from the config saved in the
checkpoint (or checks a given config against it); `encode_fn` is the jitted forward pass on uint8
images; `Encoder` wraps both with the evaluation transform for images of any size and any count.
"""

import dataclasses
from typing import Any, Callable

from etils import epath
import jax
import numpy as np

from hybridhash_jax import checkpoints
from hybridhash_jax import config_lib
from hybridhash_jax import errors
from hybridhash_jax import exported
from hybridhash_jax import input_pipeline
from hybridhash_jax import models
from hybridhash_jax import sharding
from hybridhash_jax.data import images as images_lib

DEFAULT_BATCH = 128  # images per encode call at most (config.eval_batch_size when the checkpoint has one)


def encode_fn(model, mesh, params_shardings) -> Callable:
  """jit (params, uint8 images (b, S, S, 3)) -> float32 tanh codes (b, bits), the batch split over the mesh."""
  batch_sh = sharding.batch_sharding(mesh)

  def encode(params, images):
    return model.apply({"params": params}, input_pipeline.normalize(images), train=False)

  return jax.jit(encode, in_shardings=(params_shardings, batch_sh), out_shardings=batch_sh)


@dataclasses.dataclass(frozen=True)
class Restored:
  model: Any
  params: Any
  params_shardings: Any
  config: dict  # the config saved with the checkpoint
  step: int


def restore(directory: str, mesh, config: dict | None = None, step: int | None = None) -> Restored:
  """The params of the checkpoint in `directory` (latest step, or `step`), placed on `mesh`.

  The model is built from `config`, which must agree with the saved config in the model fields, or,
  when `config` is None, from the saved config itself with its runtime fields set for the mesh's
  platform (`models.for_host`: a checkpoint trained with cuDNN attention encodes on a CPU).
  """
  built = {}

  def targets(saved: dict) -> dict:
    model_config = config["model"] if config else models.for_host(saved["model"], sharding.platform(mesh))
    min_size = (config or saved).get("mesh", {}).get("fsdp_min_size", config_lib.base_config().mesh.fsdp_min_size)
    built["model"] = models.from_config(model_config)
    abstract = models.abstract_params(built["model"])
    built["shardings"] = sharding.tree_shardings(mesh, abstract, min_size)
    return {"params": sharding.place(abstract, built["shardings"])}

  r = checkpoints.restore(directory, targets, config, step=step)
  return Restored(built["model"], r.items["params"], built["shardings"], r.config, int(r.step))


def local_mesh():
  """All of this process's devices on the batch axis: each process of a multi-host run encodes its own share."""
  devices = jax.local_devices()
  return jax.make_mesh((len(devices), 1), sharding.BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def transform_info(saved_config: dict) -> dict:
  """The evaluation transform of the checkpoint's dataset kind, as data (index.json and exports record it)."""
  size, data_name = int(saved_config["model"]["img_size"]), saved_config.get("data", {}).get("name", "folder")
  crop = input_pipeline.crops(data_name)
  return {"img_size": size, "crop": crop, "resize": images_lib.resize_size(size) if crop else size,
          "dataset": data_name, "mean": list(input_pipeline.MEAN), "std": list(input_pipeline.STD)}


def _absolute(path) -> str:
  """A local path made absolute (an index records where its encoder came from); gs:// and the like as given."""
  path = epath.Path(path)
  return str(path if path.is_absolute() else path.resolve())


class Encoder:
  """Images (uint8) -> codes, jitted once, batch-sharded over the local devices.

  `encode` pads to a few fixed batch shapes (powers of two times the device count, up to the
  batch size), so any number of images costs at most log2(batch) compilations.
  """

  def __init__(self, run: Callable[[np.ndarray], np.ndarray], info: dict, batch_size: int, multiple: int = 1,
               restored: Restored | None = None):
    self._run, self.info = run, info
    self.restored = restored  # the model and params, for an encoder from a checkpoint
    self.bits, self.img_size = int(info["bits"]), int(info["transform"]["img_size"])
    self._crop = bool(info["transform"]["crop"])
    self._multiple = multiple
    self.batch_size = -(-batch_size // multiple) * multiple

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> "Encoder":
    """The model of WORKDIR/checkpoints (latest step, or `step`), rebuilt from the config saved there."""
    directory = _absolute(epath.Path(workdir) / "checkpoints")
    mesh = local_mesh()
    r = restore(directory, mesh, step=step)
    fn = encode_fn(r.model, mesh, r.params_shardings)
    info = {"model": models.model_config(r.model), "bits": int(r.config["model"]["bits"]), "checkpoint": directory,
            "step": r.step, "encoder": None, "transform": transform_info(r.config)}
    return cls(lambda x: np.asarray(fn(r.params, x)), info, r.config.get("eval_batch_size", DEFAULT_BATCH),
               multiple=mesh.size, restored=r)

  @classmethod
  def from_export(cls, path: str) -> "Encoder":
    """A file written by `python -m hybridhash_jax.export`."""
    run, info = exported.load(path)
    return cls(run, {**info, "encoder": _absolute(path)}, info.get("batch_size", DEFAULT_BATCH))

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """Decoded RGB uint8 (H, W, 3) -> (S, S, 3) uint8: the evaluation transform of the checkpoint's dataset."""
    return np.ascontiguousarray(input_pipeline.eval_image(image, self.img_size, self._crop))

  def _padded_size(self, n: int) -> int:
    size = self._multiple
    while size < n:
      size *= 2
    return min(size, self.batch_size)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 (n, S, S, 3) -> float32 (n, bits) tanh outputs, for any n >= 1."""
    images = np.asarray(images)
    shape = (self.img_size, self.img_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
      raise ValueError(f"images must be uint8 (n, {', '.join(map(str, shape))}), got {images.dtype}{images.shape}")
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      size = self._padded_size(len(chunk))
      padded = np.concatenate([chunk, np.zeros((size - len(chunk), *shape), np.uint8)]) if size > len(chunk) else chunk
      out.append(np.asarray(self._run(padded), np.float32)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.bits), np.float32)


def open_encoder(workdir: str | None = None, encoder: str | None = None, step: int | None = None,
                 index_info: dict | None = None) -> Encoder:
  """The encoder named by `encoder` (an export) or `workdir`, else the one an index was built with."""
  if encoder or (not workdir and index_info and index_info.get("encoder")):
    return Encoder.from_export(encoder or index_info["encoder"])
  if workdir:
    return Encoder.from_workdir(workdir, step)
  if not index_info:
    raise errors.ConfigError("no encoder: pass --workdir or --encoder")
  return Encoder.from_workdir(str(epath.Path(index_info["checkpoint"]).parent),
                              index_info["step"] if step is None else step)
