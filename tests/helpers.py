"""What the tests share: the repository's paths, the tiny config, the CLIs in subprocesses, reading a workdir back."""

import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

from hybridhash_jax import config_args

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_train.py"
# The recipe of the session's shared trained model (conftest's `trained`), on top of the tiny config: AdamW's
# steady steps, a bank of the model's own codes and the quickstart's alpha keep its 12 steps' database
# codes apart (about 200 distinct of 1,547), where RMSprop's first steps drive them to a handful of patterns.
TRAINED = {"optimizer.name": "adamw", "loss.bank_init": "codes", "loss.alpha": 0.25}
EVAL_ARTEFACTS = ("results.json", "pr_curve.json", "pr_curve.png", "precision_at_n.json", "precision_at_n.png",
                  "retrieval_grid.png")  # what an evaluation writes to workdir/eval/


def tiny_config(**overrides):
  """tests/configs/tiny_train.py with `overrides` ({"model.bits": 32, "seed": 1, ...}) applied."""
  return with_overrides(config_args.load(str(TINY)), **overrides)


def with_overrides(config, **overrides):
  """A copy of `config` with `overrides` ({"model.bits": 32, "seed": 1, ...}) applied."""
  c = config.copy_and_resolve_references()
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def cli_env(devices: int = 1, **extra) -> dict:
  """The environment of a CLI started by a test: CPU, `devices` simulated devices, this checkout importable."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
  env.update(extra)
  return env


def main_cmd(workdir, *overrides, config=TINY) -> list[str]:
  """`python -m hybridhash_jax.main` of the tiny config, each override given as `--config.<override>`."""
  return [sys.executable, "-m", "hybridhash_jax.main", f"--config={config}", f"--workdir={workdir}",
          *[f"--config.{o}" for o in overrides]]


def start_main(workdir, *overrides):
  """Starts `main_cmd` on one device, its output on a pipe."""
  return subprocess.Popen(main_cmd(workdir, *overrides), env=cli_env(1), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def foreign_log_lines(text: str) -> list[str]:
  """The absl-formatted log lines of `text` ("I1204 04:37:33.219784 1399 main.py:72] ...") from files that are not
  this package's modules: other libraries' lines that reached the console."""
  ours = {p.name for p in (REPO / "hybridhash_jax").rglob("*.py")}
  lines = [l for l in text.splitlines() if re.match(r"[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ", l)]
  return [l for l in lines if l.split()[3].rsplit(":", 1)[0] not in ours]


def logged_losses(workdir) -> dict[int, float]:
  rows = [json.loads(l) for l in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def restore_state(workdir, step=None):
  """(step, params, train items) of a training checkpoint in `workdir` (the latest by default)."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                     train=ocp.args.StandardRestore()))
  return step, out["params"], out["train"]


def copy_images(src: pathlib.Path, dst: pathlib.Path, files) -> None:
  """Copies `files` (paths under `src`) to the same relative paths under `dst`."""
  for p in files:
    target = dst / pathlib.Path(p).relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(p, target)


@contextlib.contextmanager
def serving(app, timeout: float = 60.0):
  """Runs `app` on uvicorn in a thread, on a free loopback port; yields its base URL."""
  import socket
  import uvicorn
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      raise RuntimeError("the test server did not start")
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(timeout)
    sock.close()


def serve_cli(*args, **kwargs) -> subprocess.Popen:
  """`python -m hybridhash_jax.serve` started with `args`, its output on pipes."""
  return subprocess.Popen([sys.executable, "-m", "hybridhash_jax.serve", *args], cwd=REPO, env=cli_env(1), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
