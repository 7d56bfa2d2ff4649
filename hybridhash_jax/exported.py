"""Loads an exported encoder (`python -m hybridhash_jax.export`) with jax and numpy alone.

No flax, optax, orbax or grain: a serving host needs only this module. The file is a NumPy
`.npz` archive (no pickles) holding
  exported   the `jax.export` serialisation of uint8 images (b, S, S, 3) -> float32 tanh codes
             (b, bits), b symbolic, taking the params as its first argument (a flat list);
  info       JSON: model fields, bits, checkpoint and step, the image transform, the platforms
             it was lowered for, and each param's dtype and shape;
  param_<i>  the raw bytes of each param (bfloat16 included), in the exported function's order.
Images must already be transformed to S x S (see info["transform"]); codes are binarised as
code >= 0 (bit set), as `metrics.pack_codes`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from hybridhash_jax import errors


def load(path: str):
  """(encode, info): encode maps uint8 (n, S, S, 3) images to float32 (n, bits) codes on the default device."""
  try:
    with np.load(path, allow_pickle=False) as z:
      info = json.loads(z["info"].tobytes().decode("utf-8"))
      exp = jax.export.deserialize(bytearray(z["exported"].tobytes()))
      params = [np.frombuffer(z[f"param_{i}"].tobytes(), jnp.dtype(p["dtype"])).reshape(p["shape"])
                for i, p in enumerate(info["params"])]
  except FileNotFoundError as e:
    raise errors.NotFoundError(f"{path}: no exported encoder there") from e
  except Exception as e:  # noqa: BLE001  # a zip, JSON or serialisation error all mean "this file"
    raise errors.DataError(f"{path}: not an exported encoder ({type(e).__name__}: {e})") from e
  params = [jax.device_put(p) for p in params]

  def encode(images: np.ndarray) -> np.ndarray:
    return np.asarray(exp.call(params, np.asarray(images, np.uint8)))

  return encode, info
