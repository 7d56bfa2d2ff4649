"""Search an index in the browser: `python -m hybridhash_jax.serve --index=OUT [--workdir=W | --encoder=PATH]`.

Opens the index, restores its encoder (by default the checkpoint or exported encoder the index was
built with), checks the two belong together, prints the URL to open and serves `webapp.create_app`
on uvicorn, on loopback unless --host says otherwise. A newly committed index is served once the
poll (--reload_s) or a SIGHUP finds it. A user error (a missing or corrupt index, an
encoder of another model) ends with one `error: ...` line and exit status 1; `cli.console` gives
that, the log level and the signals (SIGINT or SIGTERM: the server stops, exit status 130 or 143).
"""

import argparse
import signal

from hybridhash_jax import cli
from hybridhash_jax import errors


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m hybridhash_jax.serve", description=__doc__.split("\n\n")[0])
  p.add_argument("--index", required=True, help="index directory (python -m hybridhash_jax.index build)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--workdir", help="training workdir: the model of WORKDIR/checkpoints (default: the index's own)")
  g.add_argument("--encoder", help="an exported encoder (python -m hybridhash_jax.export)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
  p.add_argument("--port", type=int, default=8080)
  p.add_argument("--max_upload_mb", type=float, default=10.0, help="larger request bodies get 413")
  p.add_argument("--batch_window_ms", type=float, default=3.0,
                 help="how long the batcher waits for more uploads to encode together")
  p.add_argument("--max_batch", type=int, default=32, help="most uploads encoded in one batch")
  p.add_argument("--no_batching", action="store_true", help="encode each upload alone (for benchmarks)")
  p.add_argument("--max_inflight", type=int, default=32,
                 help="most uploads read, decoded and encoded at once; more get 503 with Retry-After")
  p.add_argument("--reload_s", type=float, default=5.0,
                 help="seconds between checks for a newly committed index (0: on SIGHUP only)")
  cli.add_log_level(p)
  return p


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  with cli.console(args.log_level):
    uvicorn = errors.import_extra("uvicorn", "serve")
    errors.import_extra("fastapi", "serve")
    cli.compilation_cache()
    from hybridhash_jax import encoding
    from hybridhash_jax import hamming_index  # the `serve` extra's modules, imported once it is known present
    from hybridhash_jax import webapp
    index = hamming_index.HammingIndex.open(args.index)
    encoder = encoding.open_encoder(args.workdir, args.encoder, args.step, index.info)
    index.check_encoder(encoder)
    app = webapp.create_app(index, encoder, max_upload_bytes=int(args.max_upload_mb * 2**20),
                            batch_window_s=args.batch_window_ms / 1e3, max_batch=args.max_batch,
                            batching=not args.no_batching, max_inflight=args.max_inflight,
                            reload_s=args.reload_s or None)
    signal.signal(signal.SIGHUP, lambda *_: app.state.live.wake())
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Searching {len(index)} items ({index.bits} bits): open http://{host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
  main()
