"""The device mesh and the rules that place arrays on it.

One code path for 1 CPU, 8 GPUs or a TPU pod slice: the batch is split over every
device (`data` x `fsdp`), params are replicated, or, with `mesh.fsdp > 1`, large
params and their optimiser state are split over the `fsdp` axis (FSDP).
"""

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hybridhash_jax import errors

BATCH_AXES = ("data", "fsdp")


def _cluster_detected() -> bool:
  """Multi-process launches that `jax.distributed.initialize()` can configure by itself."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins the other processes of a multi-host run: explicitly, or where the cluster says how (TPU, SLURM, MPI)."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_detected():
    jax.distributed.initialize()


def make_mesh(mesh_config) -> Mesh:
  """Builds a (data, fsdp) mesh; `data=-1` takes all devices the fsdp axis leaves."""
  n = jax.device_count()
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if fsdp < 1 or n % fsdp:
    raise errors.ConfigError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise errors.ConfigError(f"mesh.data={data} x mesh.fsdp={fsdp} must equal the {n} devices")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def platform(mesh: Mesh | None = None) -> str:
  """The mesh's device platform ("cpu", "gpu", "tpu"), or the default backend's without a mesh."""
  return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Splits the largest axis divisible by the fsdp size, for leaves of `min_size` elements or more."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, abstract_tree, min_size: int):
  """Shardings for a params-shaped tree (params, optimiser state): by shape, so both agree.

  `min_size` is `config.mesh.fsdp_min_size`.
  """
  size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size, min_size)), abstract_tree)


def place(abstract_tree, shardings):
  """Attaches shardings to abstract arrays: the targets orbax restores onto."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Assembles each process's slice of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def local_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
  """The rows this process feeds; the global batch must split evenly over every device."""
  n = mesh.size
  if global_batch_size % n:
    raise errors.ConfigError(f"{field}={global_batch_size} must be divisible by the {n} devices of the mesh")
  return global_batch_size // jax.process_count()
