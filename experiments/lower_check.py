"""Lowers the accelerator programs for GPU and TPU on a CPU host, and prints what the lowered modules hold.

  python -m experiments.lower_check --config=configs/cifar10.py --platforms=cuda,tpu

One JSON line, {"cuda": {...}, "tpu": {...}}; for each platform and program, "status" is "ok" or the
error. Programs, built by the functions training and evaluation use, on a mesh of --devices simulated
CPU devices (lowering needs no accelerator):
  train_step       `train.make_train_step`: the config's model, batch and memory bank (--train_size rows),
                   the mesh all `data`;
  train_step_fsdp  the same with mesh.fsdp = --devices;
  encode           `encoding.encode_fn`, the evaluation encoder, at eval_batch_size, the mesh all `data`;
  ranking_sort     the sort ranking kernel (`metrics.sort_kernel_program`) at --queries x --database, the
                   database sharded over `data`.
Each gives the lowered StableHLO's size, its custom calls, host callbacks, float64 values, donated inputs
(aliased to an output or only donors) and the warnings of lowering ("donated buffers were not usable"), and,
from the same program partitioned by XLA's CPU compiler for the same mesh, its collectives (instructions and
the bytes they produce), the all-gathers of param-shaped arrays and the argument bytes each device holds. A
train step also gives how many param leaves are split and the params' bytes per device. Lowering a 224 px
train step takes minutes. cuDNN attention cannot lower without cuDNN: `experiments/device_check.py` runs it
on a GPU. Results: docs/training.md, "Lowering for accelerators".
"""

import copy
import json
import re
import warnings

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from hybridhash_jax import encoding
from hybridhash_jax import input_pipeline
from hybridhash_jax import metrics
from hybridhash_jax import models
from hybridhash_jax import sharding
from hybridhash_jax import train

PROGRAMS = ("train_step", "train_step_fsdp", "encode", "ranking_sort")
FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Only when run: its --config and --devices would clash with main's and the experiments' in one process."""
  config_flags.DEFINE_config_file("config", "configs/cifar10.py", "Config whose programs to lower.")
  flags.DEFINE_list("platforms", ["cuda", "tpu"], "Platforms to lower for.")
  flags.DEFINE_list("programs", list(PROGRAMS), "Programs to lower.")
  flags.DEFINE_integer("devices", 8, "Simulated CPU devices: the mesh's size.")
  flags.DEFINE_integer("train_size", 5000, "Training images, the memory bank's rows (CIFAR-10: 5,000).")
  flags.DEFINE_integer("queries", 1000, "Ranking queries (CIFAR-10: 1,000).")
  flags.DEFINE_integer("database", 54000, "Ranking database size (CIFAR-10: 54,000).")


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# The partitioned module only counts collectives: the CPU backend's code generation is not wanted.
_PARTITION_OPTIONS = {"xla_backend_optimization_level": 0}
# An HLO instruction's result (one shape, or a tuple of them: combined collectives) and its collective opcode.
_HLO_OP = re.compile(r"= (\([^()]*\)|\S+) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_HLO_SHAPE = re.compile(r"(pred|[su]\d+|b?f\d+)\[([\d,]*)\]")
_CUSTOM_CALL = re.compile(r"custom_call @([\w.$-]+)|call_target_name = \"([^\"]+)\"")
_F64 = re.compile(r"tensor<(?:[\d?]+x)*f64>")


def _batch(config, mesh, size: int) -> dict:
  sh = sharding.batch_sharding(mesh)
  s, c = config.model.img_size, config.data.num_classes
  return {"image": jax.ShapeDtypeStruct((size, s, s, 3), jnp.uint8, sharding=sh),
          "label": jax.ShapeDtypeStruct((size, c), jnp.float32, sharding=sh),
          "index": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sh)}


def _with_mesh(config, fsdp: int = 1):
  """A copy of the config on every device: data-parallel, or all fsdp."""
  config = copy.deepcopy(config)
  config.mesh.update(data=-1, fsdp=fsdp)
  return config, sharding.make_mesh(config.mesh)


def train_step(config, train_size: int, fsdp: int = 1):
  """The train step as training builds it: (jitted step, (state, batch), {}, abstract params)."""
  config, mesh = _with_mesh(config, fsdp)
  splits = input_pipeline.Splits(train=range(train_size), query=range(0), database=range(0),
                                 num_classes=config.data.num_classes, top_k=-1, name="lowering")
  setup = train.build(config, splits, mesh)
  state = setup.abstract_state
  return train.make_train_step(setup, config), (state, _batch(config, mesh, config.batch_size)), {}, state.params


def encode(config):
  """The evaluation encoder on a data-parallel mesh: (jitted encode, (params, images), {}, abstract params)."""
  config, mesh = _with_mesh(config)
  model = models.from_config(config.model)
  abstract = models.abstract_params(model)
  params_sh = sharding.tree_shardings(mesh, abstract, config.mesh.fsdp_min_size)
  params = sharding.place(abstract, params_sh)
  return (encoding.encode_fn(model, mesh, params_sh), (params, _batch(config, mesh, config.eval_batch_size)["image"]),
          {}, params)


def ranking_sort(config, queries: int, database: int):
  """The sort ranking kernel with the database sharded over `data`: (jitted kernel, args, static keywords, None)."""
  _, mesh = _with_mesh(config)
  rng = np.random.default_rng(0)
  bits, classes = config.model.bits, config.data.num_classes
  codes = rng.choice(np.float32([-1, 1]), (queries + database, bits))
  labels = rng.integers(0, classes, queries + database)
  fn, args, kw = metrics.sort_kernel_program(codes[:queries], codes[queries:], labels[:queries], labels[queries:],
                                             config.data.top_k, mesh=mesh, axis_name="data")
  return fn, args, kw, None


def programs(config, train_size: int, queries: int, database: int) -> dict:
  """Name (PROGRAMS) -> thunk giving (jitted function, args, static keywords, abstract params or None)."""
  n = jax.device_count()
  return {"train_step": lambda: train_step(config, train_size),
          "train_step_fsdp": lambda: train_step(config, train_size, fsdp=n),
          "encode": lambda: encode(config),
          "ranking_sort": lambda: ranking_sort(config, queries, database)}


def scan_lowered(text: str) -> dict:
  """What a platform may reject or what costs memory, read off a lowered StableHLO module."""
  targets = sorted({a or b for a, b in _CUSTOM_CALL.findall(text)})
  main = next(line for line in text.splitlines() if "func.func public @main(" in line)
  return {"module_bytes": len(text.encode()), "custom_calls": targets,
          "host_callbacks": sum("callback" in t for t in targets), "float64_values": len(_F64.findall(text)),
          "donated_aliased": main.count("tf.aliasing_output"), "donated_unaliased": main.count("jax.buffer_donor")}


def _shapes(result: str) -> list[tuple[int, tuple[int, ...]]]:
  """(bytes, dims) of each array of an HLO result."""
  out = []
  for dtype, dims in _HLO_SHAPE.findall(result):
    dims = tuple(int(d) for d in dims.split(",") if d)
    out.append((max(1, int(re.sub(r"\D", "", dtype) or 8) // 8) * int(np.prod(dims)), dims))
  return out


def scan_partitioned(compiled, params) -> dict:
  """Collectives of the SPMD-partitioned module (instructions, and the bytes they produce), the all-gathers of
  param-shaped arrays, and the argument bytes each device holds."""
  ops = [(op, _shapes(result)) for result, op in _HLO_OP.findall(compiled.as_text())]
  param_shapes = {tuple(p.shape) for p in jax.tree.leaves(params)} if params is not None else set()
  gathered = [dims for op, shapes in ops if op == "all-gather" for _, dims in shapes]
  out = {"collectives": {c: sum(op == c for op, _ in ops) for c in COLLECTIVES},
         "collective_bytes": {c: sum(b for op, shapes in ops if op == c for b, _ in shapes) for c in COLLECTIVES},
         "param_all_gathers": sum(dims in param_shapes for dims in gathered)}
  mem = compiled.memory_analysis()
  if mem is not None:
    out["argument_bytes_per_device"] = int(mem.argument_size_in_bytes)
  return out


def param_layout(params) -> dict:
  """How many param leaves are sharded, and the params' bytes on each device against their total."""
  leaves = jax.tree.leaves(params)
  sharded = [p for p in leaves if p.sharding.shard_shape(p.shape) != tuple(p.shape)]
  nbytes = lambda p, shape: int(np.prod(shape)) * jnp.dtype(p.dtype).itemsize
  return {"param_leaves": len(leaves), "param_leaves_sharded": len(sharded),
          "param_bytes": sum(nbytes(p, p.shape) for p in leaves),
          "param_bytes_per_device": sum(nbytes(p, p.sharding.shard_shape(p.shape)) for p in leaves)}


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {e}"[:400]


def _lower(name: str, build, platforms) -> dict:
  """{platform: report} of one program."""
  try:
    fn, args, kw, params = build()
    traced = fn.trace(*args, **kw)
    common = scan_partitioned(traced.lower().compile(_PARTITION_OPTIONS), params)
    if name.startswith("train_step"):
      common.update(param_layout(params))
  except Exception as e:  # noqa: BLE001  # one program's failure is its row; the others still run
    return {p: {"status": _error(e)} for p in platforms}
  rows = {}
  for p in platforms:
    try:
      rows[p] = {"status": "ok", **scan_lowered(traced.lower(lowering_platforms=(p,)).as_text()), **common}
    except Exception as e:  # noqa: BLE001
      rows[p] = {"status": _error(e)}
  return rows


def check(config, platforms, names=None, *, train_size: int = 5000, queries: int = 1000, database: int = 54000) -> dict:
  """{platform: {program: report}} for the programs of `programs` named in `names` (default all), lowered for
  each of `platforms`. A report's "warnings" are those of tracing, lowering and partitioning the program
  (an unusable donation among them)."""
  table = {p: {} for p in platforms}
  for name, build in programs(config, train_size, queries, database).items():
    if names is not None and name not in names:
      continue
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      rows = _lower(name, build, platforms)
    seen = sorted({str(w.message)[:200] for w in caught})
    for p, row in rows.items():
      table[p][name] = dict(row, warnings=seen) if row["status"] == "ok" else row
  return table


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  table = check(FLAGS.config, FLAGS.platforms, FLAGS.programs, train_size=FLAGS.train_size, queries=FLAGS.queries,
                database=FLAGS.database)
  print(json.dumps(table))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
