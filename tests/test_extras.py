"""The core install trains and evaluates; the index, the server and TFDS need their extras, and say which.

Each test runs a process in which the optional modules cannot be imported (`sys.modules[name] = None` makes
`import name` raise ImportError), as on a machine with only `pip install hybridhash-jax`.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from hybridhash_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("faiss", "pyarrow", "fastapi", "starlette", "uvicorn", "multipart", "python_multipart",
            "tensorflow_datasets", "tensorflow")

def _run_without_extras(code: str, *args: str) -> subprocess.CompletedProcess:
  prelude = f"import sys\nfor name in {OPTIONAL!r}:\n  sys.modules[name] = None\n"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # a fresh process, which imports jax
def test_the_training_and_evaluation_path_needs_no_extra():
  proc = _run_without_extras("""
      import runpy
      from hybridhash_jax import main, train, evaluate, checkpoints, input_pipeline, config_lib, encoding, export
      from hybridhash_jax.data import cifar10, digits, folder, listfile, images, splits
      config = runpy.run_path("configs/quickstart.py")["get_config"]()
      config_lib.validate(config)
      config_lib.validate_training(config)
      print("imported", sorted(n for n in sys.modules if n.split(".")[0] in {OPTIONAL!r} and sys.modules[n]))
  """.replace("{OPTIONAL!r}", repr(OPTIONAL)))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "imported []"


@pytest.mark.slow  # fresh processes, which import jax
@pytest.mark.parametrize("argv, extra, module", [
    (["hybridhash_jax.index", "search", "--index=/nonexistent", "--id", "0"], "search", "faiss"),
    (["hybridhash_jax.index", "export", "--index=/nonexistent", "--format=npy", "--output=/tmp/x"], "search",
     "faiss"),
    (["hybridhash_jax.serve", "--index=/nonexistent"], "serve", "uvicorn"),
])
def test_a_cli_without_its_extra_names_the_extra_in_one_line(argv, extra, module):
  proc = _run_without_extras("""
      import runpy
      sys.argv = sys.argv[1:]
      runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
  """, *argv)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1:] == [
      f"error: {module} is not installed: pip install 'hybridhash-jax[{extra}]'"], proc.stderr
  assert "Traceback" not in proc.stderr


def test_cifar10_from_tfds_without_the_extra_is_a_config_error(monkeypatch):
  from hybridhash_jax.data import cifar10
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(errors.ConfigError, match=r"data\.source='tfds'.*hybridhash-jax\[tfds\]"):
    cifar10.open_tfds("/nonexistent")


def test_import_extra_returns_the_module_or_names_the_extra(monkeypatch):
  assert errors.import_extra("json", "search") is sys.modules["json"]
  monkeypatch.setitem(sys.modules, "faiss", None)
  message = r"^faiss is not installed: pip install 'hybridhash-jax\[search\]'$"
  with pytest.raises(errors.MissingExtraError, match=message):
    errors.import_extra("faiss", "search")
