"""Search your images: `python -m hybridhash_jax.index build | search | export`.

  build   --workdir=W [--step=N] | --encoder=PATH, --images=DIR|LIST --index=OUT [--kind=flat|multihash|ivf]
  build   --codes=CODES.npy [--items=ITEMS.parquet] --index=OUT [--kind=flat|multihash|ivf]
  search  --index=OUT --query IMG [IMG ...] | --id N [N ...]  [--k=10 | --radius=R] [--format=table|json]
          [--grid=PNG] [--workdir=W | --encoder=PATH: default, the index's own]
  export  --index=OUT --format=parquet|npy --output=PATH

Thin on purpose: the library is `hamming_index` (index) and `encoding` (checkpoint -> codes).
`cli.console` gives the log level, the `error:` line (a missing or corrupt file, a non-image query,
an encoder of another model: exit status 1) and the signals: SIGINT or SIGTERM stops a build with
exit status 130 or 143, keeping the chunks it staged, so the same command resumes.
"""

import argparse
import dataclasses
import glob
import json
import os
import signal
import sys

import numpy as np

from hybridhash_jax import cli
from hybridhash_jax import errors
from hybridhash_jax import interrupts


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m hybridhash_jax.index", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)

  def encoder_args(s, required):
    g = s.add_mutually_exclusive_group(required=required)
    g.add_argument("--workdir", help="training workdir: the model of WORKDIR/checkpoints")
    g.add_argument("--encoder", help="an exported encoder (python -m hybridhash_jax.export)")
    s.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")

  b = sub.add_parser("build", help="encode a folder (or list file) of images into an index, or index packed codes")
  encoder_args(b, False)
  source = b.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", help="folder of images (recursive) or a list file of paths")
  source.add_argument("--codes", help="packed codes: a .npy of uint8 (n, bits / 8) in the documented bit order")
  b.add_argument("--items", default=None, help="with --codes: a parquet item table (path, label), row = id")
  b.add_argument("--index", required=True, help="index directory to create or update")
  b.add_argument("--kind", default="flat", help="flat (exact) | multihash (exact) | ivf (approximate)")
  b.add_argument("--chunk", type=int, default=1024, help="images per staged chunk (resume granularity)")
  b.add_argument("--nhash", type=int, default=None, help="multihash: number of tables (default ceil(bits / log2 n))")
  b.add_argument("--nlist", type=int, default=None, help="ivf: number of lists (default 4 sqrt(n))")
  b.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-process builds)")
  b.add_argument("--num_processes", type=int, default=None)
  b.add_argument("--process_id", type=int, default=None)

  s = sub.add_parser("search", help="query an index with images or indexed items")
  s.add_argument("--index", required=True)
  q = s.add_mutually_exclusive_group(required=True)
  q.add_argument("--query", nargs="+", help="image files")
  q.add_argument("--id", nargs="+", type=int, help="ids of indexed items")
  r = s.add_mutually_exclusive_group()
  r.add_argument("--k", type=int, default=None, help="the k nearest (default 10)")
  r.add_argument("--radius", type=int, default=None, help="everything within this Hamming distance")
  s.add_argument("--format", default="table", choices=("table", "json"))
  s.add_argument("--grid", default=None, help="PNG of the queries and their results")
  encoder_args(s, False)

  e = sub.add_parser("export", help="ids, paths and packed codes for Milvus, OpenSearch, ...")
  e.add_argument("--index", required=True)
  e.add_argument("--format", required=True, choices=("parquet", "npy"))
  e.add_argument("--output", required=True, help="a .parquet file, or a folder for npy")
  for command in (b, s, e):
    cli.add_log_level(command)
  return p


def _encoder(args, info: dict | None = None):
  from hybridhash_jax import encoding  # after jax.distributed
  return encoding.open_encoder(args.workdir, args.encoder, args.step, info)


def _build_codes(args) -> None:
  from hybridhash_jax import index_build
  info = index_build.build_from_codes(args.codes, args.index, kind=args.kind, items=args.items, nhash=args.nhash,
                                      nlist=args.nlist)
  print(f"{args.index}: {info['count']} codes indexed ({info['kind']}, {info['bits']} bits), "
        f"{info['build']['seconds']:.1f} s")
  print(f"next: python -m hybridhash_jax.index search --index={args.index} --id 0")


def _build(args) -> None:
  if args.codes:
    if args.workdir or args.encoder:
      raise errors.ConfigError("--codes are indexed as they are: give no --workdir or --encoder")
    return _build_codes(args)
  if args.items:
    raise errors.ConfigError("--items goes with --codes (an index of images has its own item table)")
  if not (args.workdir or args.encoder):
    raise errors.ConfigError("--images needs the model that encodes them: --workdir=W or --encoder=PATH")
  from hybridhash_jax import sharding
  sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  import jax
  from jax.experimental import multihost_utils
  from hybridhash_jax import index_build
  multi = jax.process_count() > 1
  try:
    info = index_build.build(_encoder(args), args.images, args.index, kind=args.kind, chunk_size=args.chunk,
                             nhash=args.nhash, nlist=args.nlist, process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             barrier=multihost_utils.sync_global_devices if multi else None)
  except interrupts.Interrupted as e:
    signum = e.signum  # raised again below, once the build's frames (and its progress bar) are gone
  else:
    signum = None
  if signum is not None:
    # Every staged chunk was written whole (to a temporary name, then renamed): a rerun reuses them.
    staging = os.path.join(args.index, index_build.STAGING)
    staged = len(glob.glob(os.path.join(staging, "*.npz")))
    raise interrupts.Interrupted(signum, f"stopped by {signal.Signals(signum).name}: {staged} chunks of up to "
                                 f"{args.chunk} images staged in {staging}; rerun the same command to resume")
  if jax.process_index() == 0:
    for path, reason in info["skipped"]:
      print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{args.index}: {info['count']} images indexed ({info['kind']}, {info['bits']} bits), "
          f"{info['build']['encoded']} encoded, {info['build']['resumed']} resumed, {len(info['skipped'])} skipped, "
          f"{info['build']['seconds']:.1f} s")
    print(f"next: python -m hybridhash_jax.index search --index={args.index} --id 0, or "
          f"python -m hybridhash_jax.serve --index={args.index}")


def _query_label(path: str) -> str:
  return os.path.basename(os.path.dirname(os.path.abspath(path)))


def _search(args) -> None:
  from hybridhash_jax import hamming_index
  from hybridhash_jax.data import images
  index = hamming_index.HammingIndex.open(args.index)
  k = 10 if args.k is None and args.radius is None else args.k
  encoder = None
  if args.query:
    decoded = [images.decode(p) for p in args.query]  # a non-image query fails here, naming it
    encoder = _encoder(args, index.info)
    index.check_encoder(encoder)
    views = np.stack([encoder.preprocess(im) for im in decoded])
    codes = hamming_index.pack(encoder.encode(views))
    queries, query_labels = list(args.query), [_query_label(p) for p in args.query]
  else:
    codes = index.codes_of(args.id)
    queries, query_labels = list(args.id), [index.item(i)["label"] for i in args.id]
  hits = index.search(codes, k=k, radius=args.radius)
  for query, row in zip(queries, hits):
    if args.format == "json":
      print(json.dumps({"query": query, "results": [dataclasses.asdict(h) for h in row]}))
    else:
      print(f"query {query}: {len(row)} results")
      print(f"{'rank':>5} {'id':>8} {'dist':>4}  {'label':<16} path")
      for h in row:
        print(f"{h.rank:>5} {h.id:>8} {h.distance:>4}  {h.label or '-':<16} {h.path}")
  if args.grid:
    _grid(args, index, encoder, queries, query_labels, hits)


def _grid(args, index, encoder, queries, query_labels, hits) -> None:
  from hybridhash_jax import plots
  from hybridhash_jax.data import images
  encoder = encoder or _encoder(args, index.info)

  def view(path):
    return encoder.preprocess(images.decode(path))

  cols = max(1, max(len(row) for row in hits))
  size = (encoder.img_size, encoder.img_size, 3)
  q_views = np.stack([view(q) if isinstance(q, str) else view(index.item_path(q)) for q in queries])
  db_views = np.zeros((len(hits), cols, *size), np.uint8)
  relevant = np.zeros((len(hits), cols), bool)
  for i, row in enumerate(hits):
    for j, h in enumerate(row):
      db_views[i, j] = view(index.item_path(h.id))
      relevant[i, j] = h.label is not None and h.label == query_labels[i]
  top = np.arange(len(hits) * cols).reshape(len(hits), cols)
  plots.plot_retrieval_grid(q_views, db_views.reshape(-1, *size), top, relevant, args.grid)


def _export(args) -> None:
  from hybridhash_jax import hamming_index
  from hybridhash_jax import index_io
  for path in index_io.export(hamming_index.HammingIndex.open(args.index), args.output, args.format):
    print(path)


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  with cli.console(args.log_level):
    if args.command != "export":
      cli.compilation_cache()
    {"build": _build, "search": _search, "export": _export}[args.command](args)


if __name__ == "__main__":
  main()
