"""Exports a checkpoint's encoder: `python -m hybridhash_jax.export --workdir=W --output=PATH [--step=N]`.

The file (see `exported.py` for its layout) holds a `jax.export` serialisation of uint8 images
(b, S, S, 3) -> float32 tanh codes (b, bits), the batch symbolic, lowered for several platforms
(cpu, cuda and tpu by default: lowering needs no such hardware), and the params beside it. It loads
and runs with jax and numpy alone (`exported.load`), and `index build/search --encoder=PATH` take it.
"""

import argparse
import json
import os

from absl import logging
import jax
import numpy as np

from hybridhash_jax import cli
from hybridhash_jax import encoding
from hybridhash_jax import errors
from hybridhash_jax import input_pipeline

PLATFORMS = ("cpu", "cuda", "tpu")


def _lower(fn, args, platforms):
  try:
    return jax.export.export(jax.jit(fn), platforms=platforms)(*args)
  except Exception as e:  # noqa: BLE001  # a platform this jax cannot lower for
    logging.warning("cannot lower the encoder for %s: %s", platforms, e)
    return None


def export_encoder(workdir: str, output: str, step: int | None = None, platforms=PLATFORMS) -> dict:
  """Writes the encoder of WORKDIR/checkpoints (latest step, or `step`) to `output`; returns its info.

  Every platform of `platforms` the installed jax can lower for is included; the others are
  named in the log and left out.
  """
  enc = encoding.Encoder.from_workdir(workdir, step)
  r = enc.restored
  leaves, treedef = jax.tree.flatten(jax.device_get(r.params))

  def encode(params, images):
    return r.model.apply({"params": jax.tree.unflatten(treedef, params)}, input_pipeline.normalize(images),
                         train=False)

  (batch,) = jax.export.symbolic_shape("b")
  args = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
          jax.ShapeDtypeStruct((batch, enc.img_size, enc.img_size, 3), np.uint8))
  lowered = [p for p in platforms if _lower(encode, args, (p,)) is not None]
  if not lowered:
    raise errors.ConfigError(f"--platforms: the encoder cannot be lowered for any of {tuple(platforms)}")
  exp = _lower(encode, args, tuple(lowered))
  info = {**enc.info, "platforms": lowered, "batch_size": enc.batch_size,
          "params": [{"dtype": np.dtype(x.dtype).name, "shape": list(x.shape)} for x in leaves]}
  arrays = {f"param_{i}": np.frombuffer(np.ascontiguousarray(x).tobytes(), np.uint8) for i, x in enumerate(leaves)}
  tmp = f"{output}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, exported=np.frombuffer(exp.serialize(), np.uint8),
             info=np.frombuffer(json.dumps(info).encode("utf-8"), np.uint8), **arrays)
  os.replace(tmp, output)
  return info


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m hybridhash_jax.export", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="training workdir: the model of WORKDIR/checkpoints")
  p.add_argument("--output", required=True, help="the file to write (an .npz archive)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--platforms", default=",".join(PLATFORMS), help="comma-separated: cpu,cuda,tpu")
  cli.add_log_level(p)
  args = p.parse_args(argv)
  with cli.console(args.log_level):
    cli.compilation_cache()
    info = export_encoder(args.workdir, args.output, args.step, tuple(args.platforms.split(",")))
  print(f"{args.output}: {info['bits']}-bit encoder of {info['checkpoint']} step {info['step']}, "
        f"for {', '.join(info['platforms'])}")


if __name__ == "__main__":
  main()
