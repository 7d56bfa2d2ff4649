"""Image decoding and the reference's resize/crop geometry, on NumPy/PIL.

Decoding turns every failure (missing file, unknown format, truncated data, a decompression
bomb) into a `BadImageError` that names the file, so that no bad file becomes a silently
garbage training example. PIL's decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) is left as is.
"""

import io

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

from hybridhash_jax import errors
from hybridhash_jax import files

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SKIP_LOG = "skipped_images.txt"


class BadImageError(errors.DataError):
  """An image file that cannot become an RGB array; the message starts with its path."""


def _to_rgb(img: Image.Image) -> np.ndarray:
  if img.mode in ("I", "F") or img.mode.startswith("I;16"):
    # convert("RGB") would clip 16-bit values at 255, i.e. a white image; rescale instead.
    if img.mode == "F":
      raise ValueError("floating-point images are not supported")
    gray = np.round(np.asarray(img, np.float64) / 257.0).clip(0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(img.convert("RGB"), np.uint8)


def _decode(source, name: str) -> np.ndarray:
  try:
    with Image.open(source) as img:
      img.load()  # decodes now, so truncation raises here rather than as a grey tail
      return _to_rgb(img)
  except Exception as e:  # noqa: BLE001  # PIL raises many types on corrupt data, all mean "this file"
    raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def decode(path: str) -> np.ndarray:
  """Reads `path` into an RGB uint8 (H, W, 3) array, whatever the image mode (P, L, LA, RGBA, CMYK, I;16...)."""
  return _decode(path, path)


def decode_bytes(data: bytes, name: str) -> np.ndarray:
  """`decode` for an image held in memory (an upload); errors name it `name`."""
  return _decode(io.BytesIO(data), name)


def _skip_line(path: str, reason: str) -> str:
  return f"{path}\t{reason}".replace("\n", " ") + "\n"


def log_skipped(workdir: str | None, path: str, reason: str) -> None:
  """Logs a skipped file met while reading and appends it to `workdir/skipped_images.txt`.

  One short write per line in append mode, so lines from several processes stay whole.
  """
  logging.warning("Skipping %s", reason)
  if workdir:
    with (epath.Path(workdir) / SKIP_LOG).open("a") as f:
      f.write(_skip_line(path, reason))


def write_skipped(workdir: str | None, skipped: dict[str, str]) -> None:
  """Writes `workdir/skipped_images.txt` whole: the files the check before training found bad, with why."""
  if workdir:
    files.write_text(epath.Path(workdir) / SKIP_LOG, "".join(_skip_line(p, r) for p, r in skipped.items()))


def skipped_files(workdir: str) -> list[str]:
  """The distinct files skipped so far (a file met by several workers or epochs is logged more than once)."""
  path = epath.Path(workdir) / SKIP_LOG
  if not path.exists():
    return []
  return list(dict.fromkeys(line.split("\t", 1)[0] for line in path.read_text().splitlines() if line.strip()))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL bilinear resize (torchvision's default for PIL images, with its antialiasing on downscale)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision `Resize(size)`: the shorter side becomes `size`, the longer one int(size * long / short)."""
  h, w = image.shape[:2]
  if h <= w:
    return resize(image, size, int(size * w / h))
  return resize(image, int(size * h / w), size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision `CenterCrop(size)` offsets: round((H - size) / 2)."""
  h, w = image.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly placed `size` crop, mirrored left-right with probability 1/2."""
  h, w = image.shape[:2]
  top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
  crop = image[top:top + size, left:left + size]
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def resize_size(img_size: int) -> int:
  """The reference resizes to 256 before cropping 224; other model sizes keep that ratio."""
  return int(round(img_size * 256 / 224))
