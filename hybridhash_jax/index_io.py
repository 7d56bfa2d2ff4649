"""Export of an index for other engines: ids, paths, labels and packed codes (the documented bit order)."""

import json
import os

import numpy as np

from hybridhash_jax import errors
from hybridhash_jax import files
from hybridhash_jax import hamming_index
from hybridhash_jax.hamming_index import pa, pq

FORMATS = ("parquet", "npy")


def export(index: hamming_index.HammingIndex, output: str, fmt: str) -> list[str]:
  """Writes ids, paths, labels and packed codes (bytes, the documented bit order) for other engines.

  parquet: one file, columns id (int64), path (string), label (string), code (fixed-size binary of
  bits / 8 bytes). npy: a folder of ids.npy (int64), codes.npy (uint8 (n, bits / 8)), paths.npy and
  labels.npy (unicode; "" for no label). Both sit beside a copy of index.json (`bit_order` says the
  layout). Every file is written whole or not at all (`files`).
  """
  if fmt not in FORMATS:
    raise errors.ConfigError(f"--format={fmt!r} is not one of {FORMATS}")
  n = len(index)
  ids = np.arange(n, dtype=np.int64)
  table = index.items
  paths = table.column("path").to_pylist() if table is not None else [None] * n
  labels = table.column("label").to_pylist() if table is not None else [None] * n
  codes = np.asarray(index.codes)
  if fmt == "parquet":
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    out = pa.table({"id": ids, "path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string()),
                    "code": pa.FixedSizeBinaryArray.from_buffers(pa.binary(index.bits // 8), n,
                                                                 [None, pa.py_buffer(codes.tobytes())])},
                   metadata={"hybridhash": json.dumps({"bits": index.bits, "bit_order": hamming_index.BIT_ORDER})})
    files.write_stream(output, lambda f: pq.write_table(out, f))
    written = [output]
  else:
    os.makedirs(output, exist_ok=True)
    written = []
    for name, arr in (("ids", ids), ("codes", codes), ("paths", np.asarray([p or "" for p in paths], dtype=str)),
                      ("labels", np.asarray([l or "" for l in labels], dtype=str))):
      written.append(os.path.join(output, f"{name}.npy"))
      files.write_stream(written[-1], lambda f, arr=arr: np.save(f, arr))
  meta = output + ".index.json" if fmt == "parquet" else os.path.join(output, hamming_index.INDEX_JSON)
  files.write_json(meta, index.info, indent=2)
  return written + [meta]
