"""`pytest -n auto`: one xdist worker per usable core, at most four, and one pair of caches for all of them."""

import os

from tests import conftest


def test_auto_is_one_worker_per_usable_core_at_most_four(monkeypatch):
  for cores, workers in ((1, 1), (2, 2), (3, 3), (16, 4)):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
    assert conftest.pytest_xdist_auto_num_workers(None) == workers


def test_workers_share_the_first_process_caches():
  made_here = int(os.environ["HYBRIDHASH_TEST_CACHES_OWNER"]) == os.getpid()
  assert made_here == ("PYTEST_XDIST_WORKER" not in os.environ)  # a worker uses the caches it inherited
  for name in ("JAX_COMPILATION_CACHE_DIR", "NUMBA_CACHE_DIR"):
    assert os.path.isdir(os.environ[name]), name
