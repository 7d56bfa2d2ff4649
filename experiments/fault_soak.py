"""Fault soak: training and index builds killed at random moments, checkpoints corrupted, results compared.

  python -m experiments.fault_soak --rounds=30 [--corrupt_every=3] [--seed=0] [--out=DIR]

One unbroken run of the tiny config (tests/configs/tiny_train.py) and one index build from it are the
reference. Then one workdir is trained round by round: each round starts (resumes) the run and kills it
with SIGKILL or SIGTERM at a random moment (one round in four while it starts up and restores, the others
a random fraction of a second after a random number of new steps, about steps / rounds), and every k-th
round corrupts its newest checkpoint (when an older one is left to resume from). Each round also rebuilds
an index from the reference checkpoint and kills that build at a random moment; whatever index is left
must give the reference's codes. At the end the run and the build are completed and compared with the
references: params bit for bit, and, should they differ (a checkpoint lost), the final mAP within
--map_tolerance. Prints one JSON object.
"""

import concurrent.futures
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from hybridhash_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_train.py"

ROUNDS = flags.DEFINE_integer("rounds", 30, "Rounds of killed training and killed index builds.")
CORRUPT_EVERY = flags.DEFINE_integer("corrupt_every", 3, "Corrupt the newest checkpoint every k-th round.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments, signals and damage.")
STEPS = flags.DEFINE_integer("steps", None, "num_train_steps of the runs (default 8 per round, at least 24).")
STARTUP_WAIT = flags.DEFINE_float("startup_wait", 5.0, "Longest wait of a kill during start-up, s.")
MAP_TOLERANCE = flags.DEFINE_float("map_tolerance", 0.05, "Final mAP difference allowed where a checkpoint was lost.")
OUT = flags.DEFINE_string("out", None, "Folder for the workdirs (default: a new temporary folder).")

DAMAGE = ("truncate", "flip_header", "metadata")
_CACHE = pathlib.Path(tempfile.gettempdir()) / "hybridhash-fault-soak-cache"


def _env():
  """CPU, one device, and one persistent compilation cache for every run of the soak (filled by the reference
  run): a round then spends its time training, not compiling the same programs again. The cache holds
  executables, so it changes no result."""
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONUNBUFFERED="1",
              JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(_CACHE),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _train_cmd(workdir, steps):
  return [sys.executable, "-m", "hybridhash_jax.main", f"--config={TINY}", f"--workdir={workdir}",
          f"--config.num_train_steps={steps}", "--config.keep_checkpoints=1000"]


def _index_cmd(workdir, images, index):
  return [sys.executable, "-m", "hybridhash_jax.index", "build", f"--workdir={workdir}", f"--images={images}",
          f"--index={index}", "--chunk=16"]


def _start(cmd, log):
  return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _finish(cmd, log_path) -> tuple[int, float]:
  start = time.perf_counter()
  with open(log_path, "a", encoding="utf-8") as log:
    rc = _start(cmd, log).wait()
  return rc, time.perf_counter() - start


def _kill_at_random(cmd, log_path, wait: float, rng: random.Random, counts: dict, metrics=None,
                    steps: int = 0) -> int | None:
  """Runs `cmd` and kills it with a random signal `wait` s after it has logged `steps` new training steps to
  `metrics` (its metrics.jsonl), or `wait` s after its start; the exit status if it ended first."""
  start = metrics.stat().st_size if metrics is not None and metrics.exists() else 0
  with open(log_path, "a", encoding="utf-8") as log:
    proc = _start(cmd, log)
    deadline = time.perf_counter() + 600
    while steps and proc.poll() is None and time.perf_counter() < deadline:
      if metrics.exists():
        with open(metrics, "rb") as f:
          f.seek(start)
          if f.read().count(b'"loss"') >= steps:
            break
      time.sleep(0.01)
    try:
      return proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
      sig = rng.choice((signal.SIGKILL, signal.SIGTERM))
      proc.send_signal(sig)
      proc.wait()
      counts[sig.name] = counts.get(sig.name, 0) + 1
      return None


def _steps(ckpt: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _corrupt(step_dir: pathlib.Path, kind: str) -> None:
  params = step_dir / "params"
  if kind == "truncate":
    for f in params.rglob("d/*"):
      os.truncate(f, min(16, f.stat().st_size))
  elif kind == "flip_header":
    for f in params.rglob("d/*"):
      data = bytearray(f.read_bytes())
      data[:64] = bytes(b ^ 0xFF for b in data[:64])
      f.write_bytes(bytes(data))
  else:
    meta = params / "_METADATA"
    meta.write_bytes(b"\xff" * 64 + meta.read_bytes()[64:])


def _params(workdir: pathlib.Path, step: int):
  import jax
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    return jax.tree.leaves(c.restore(workdir / "checkpoints" / str(step) / "params"))


def _same(a, b) -> bool:
  import numpy as np
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _index_codes(index: pathlib.Path):
  from hybridhash_jax import hamming_index
  if not (index / hamming_index.INDEX_JSON).exists():
    return None
  opened = hamming_index.HammingIndex.open(str(index))
  return opened.codes_of(range(len(opened)))


def _final_map(workdir: pathlib.Path) -> float:
  return float(json.loads((workdir / "eval" / "results.json").read_text())["final"]["map"])


def soak(out: pathlib.Path, rounds: int, corrupt_every: int, seed: int, steps: int, startup_wait: float,
         map_tolerance: float) -> dict:
  import numpy as np
  from hybridhash_jax import demo
  t0 = time.perf_counter()
  rng = random.Random(seed)
  ref, run, images = out / "reference", out / "run", out / "images"
  demo.write_images(str(images), {f"c{i}": 8 for i in range(4)}, (20, 24))
  rc, _ = _finish(_train_cmd(ref, steps), out / "reference.log")
  if rc:
    sys.exit(f"the reference run failed (exit {rc}); see {out / 'reference.log'}")
  rc, index_wall = _finish(_index_cmd(ref, images, ref / "index"), out / "reference.log")
  if rc:
    sys.exit(f"the reference index build failed (exit {rc}); see {out / 'reference.log'}")
  ref_codes = _index_codes(ref / "index")
  kills, index_kills, corruptions, mismatches, lost, notes, damaged = {}, {}, [], 0, 0, [], set()
  index, pool = run / "index", concurrent.futures.ThreadPoolExecutor(1)
  for r in range(1, rounds + 1):
    # The round's index build runs beside its training run, killed with its own random stream.
    build = pool.submit(_kill_at_random, _index_cmd(ref, images, index), out / "index.log",
                        rng.uniform(1.0, 1.5 * index_wall), random.Random(rng.random()), index_kills)
    if rng.random() < 0.25:  # while it starts up, restores or compiles
      rc = _kill_at_random(_train_cmd(run, steps), out / "run.log", rng.uniform(0.5, startup_wait), rng, kills)
    else:  # while it trains or saves
      rc = _kill_at_random(_train_cmd(run, steps), out / "run.log", rng.uniform(0.0, 0.3), rng, kills,
                           run / "metrics.jsonl", rng.randint(1, max(1, 2 * steps // rounds)))
    if rc:
      lost += 1
      notes.append(f"round {r}: the run exited with {rc}")
    # A step's directory, by inode: a damaged one stays damaged until a resume sets it aside, and a step
    # saved again under the same number is a new directory.
    inode = {s: (run / "checkpoints" / str(s)).stat().st_ino for s in _steps(run / "checkpoints")}
    done = sorted(inode)
    if r % corrupt_every == 0 and len(done) >= 2 and inode[done[-1]] not in damaged:
      kind = rng.choice(DAMAGE)
      _corrupt(run / "checkpoints" / str(done[-1]), kind)
      corruptions.append({"round": r, "step": done[-1], "damage": kind})
      damaged.add(inode[done[-1]])
    # Steps both runs saved (a SIGTERM saves the step it stopped at, which the reference may not have).
    readable = [s for s in done if inode[s] not in damaged and (ref / "checkpoints" / str(s)).is_dir()]
    if readable and not _same(_params(run, readable[-1]), _params(ref, readable[-1])):
      mismatches += 1
      notes.append(f"round {r}: step {readable[-1]} differs from the reference")
    build.result()
    try:
      codes = _index_codes(index)
    except Exception as e:  # noqa: BLE001  # an unreadable index is what the soak counts
      codes = e
    if codes is not None and not (isinstance(codes, np.ndarray) and np.array_equal(codes, ref_codes)):
      mismatches += 1
      notes.append(f"round {r}: the index left by the killed build is not the reference's: {codes!r:.200}")
  build = pool.submit(_finish, _index_cmd(ref, images, index), out / "index.log")
  rc, _ = _finish(_train_cmd(run, steps), out / "run.log")
  if rc:
    lost += 1
    notes.append(f"the final run exited with {rc}")
  elif not _same(_params(run, steps), _params(ref, steps)):
    if abs(_final_map(run) - _final_map(ref)) > map_tolerance:
      mismatches += 1
    notes.append(f"final params differ; mAP {_final_map(run):.4f} against {_final_map(ref):.4f}")
  rc, _ = build.result()
  pool.shutdown()
  if rc or not np.array_equal(_index_codes(index), ref_codes):
    mismatches += 1
    notes.append(f"the final index build {'exited with ' + str(rc) if rc else 'differs from the reference'}")
  aside = sorted(p.name for p in (run / "checkpoints").iterdir() if ".unreadable-" in p.name)
  survived = sum(min(sum(a.startswith(f"{s}.unreadable-") for a in aside), sum(c["step"] == s for c in corruptions))
                 for s in {c["step"] for c in corruptions})
  by_signal = {k: kills.get(k, 0) + index_kills.get(k, 0) for k in sorted({*kills, *index_kills})}
  return {"rounds": rounds, "kills": sum(by_signal.values()), "kills_by_signal": by_signal,
          "kills_of": {"training": sum(kills.values()), "index_build": sum(index_kills.values())},
          "corruptions": len(corruptions), "corruptions_survived": survived, "corrupted": corruptions,
          "mismatches": mismatches, "lost_runs": lost, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
          "notes": notes, "workdir": str(out)}


def main(argv):
  del argv
  out = pathlib.Path(OUT.value or tempfile.mkdtemp(prefix="fault-soak-")).resolve()
  out.mkdir(parents=True, exist_ok=True)
  steps = STEPS.value or max(24, 8 * ROUNDS.value)
  with cli.console():
    table = soak(out, ROUNDS.value, CORRUPT_EVERY.value, SEED.value, steps, STARTUP_WAIT.value,
                 MAP_TOLERANCE.value)
  print(json.dumps(table))


if __name__ == "__main__":
  app.run(main)
