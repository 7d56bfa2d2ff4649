"""The web app's API with FastAPI's test client: every route, every bad input, and serving on after each."""

import asyncio
import concurrent.futures
import dataclasses
import io
import os
import time

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
import pytest

from hybridhash_jax import demo
from hybridhash_jax import serve
from hybridhash_jax import webapp
from hybridhash_jax.batcher import Batcher
from hybridhash_jax.data import images
from tests import data_fixtures
from tests import helpers
from tests.helpers import serving

LIMIT = 2**20  # a 1 MB upload limit keeps the over-limit bodies small


@pytest.fixture(scope="module")
def client(served):
  app = webapp.create_app(served.index, served.encoder, max_upload_bytes=LIMIT, max_batch=4)
  with TestClient(app, raise_server_exceptions=False) as c:
    yield c


def _png(array) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, "PNG")
  return out.getvalue()


def _expected(served, codes, **args):
  return [dataclasses.asdict(h) for h in served.index.search(codes, **args)[0]]


def _still_serving(client):
  assert client.get("/healthz").json() == {"status": "ok"}
  assert client.post("/api/search", json={"id": 0, "k": 3}).status_code == 200


def test_page_files(client):
  page = client.get("/")
  assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
  assert '<script src="app.js">' in page.text and 'href="style.css"' in page.text
  assert client.get("/app.js").headers["content-type"].startswith("text/javascript")
  assert client.get("/style.css").headers["content-type"].startswith("text/css")


def test_healthz_and_info(client, served):
  assert client.get("/healthz").json() == {"status": "ok"}
  info = client.get("/api/info").json()
  assert (info["size"], info["bits"], info["step"]) == (len(served.index), 16, 7)
  assert info["model"]["embed_dims"] == [8, 16, 16] and info["checkpoint"].endswith("checkpoints")
  assert info["max_upload_mb"] == 1 and info["batcher"]["enabled"]
  assert info["index"] == served.index.info


def test_search_by_id_is_the_index_order(client, served):
  result = client.post("/api/search", json={"id": 4, "k": 7}).json()
  assert result["hits"] == _expected(served, served.index.codes_of([4]), k=7)
  assert len(result["hits"]) == result["total"] == 7 and result["k"] == 7
  assert 4 in [h["id"] for h in result["hits"] if h["distance"] == 0]
  assert len({h["distance"] for h in result["hits"]}) > 2
  assert result["query"]["id"] == 4 and result["query"]["name"] == served.index.item(4)["path"]
  bits = np.unpackbits(served.index.codes_of([4])[0], bitorder="little")[:16]
  assert result["query"]["code"] == "".join(map(str, bits))
  assert {"rank", "id", "path", "distance", "label"} == set(result["hits"][0])
  assert client.post("/api/search", json={"id": 4}).json()["k"] == webapp.DEFAULT_K


def test_search_by_radius(client, served):
  result = client.post("/api/search", json={"id": 2, "radius": 6}).json()
  expected = _expected(served, served.index.codes_of([2]), radius=6)
  assert result["hits"] == expected and result["total"] == len(expected) and result["radius"] == 6
  assert all(h["distance"] <= 6 for h in result["hits"])
  everything = client.post("/api/search", json={"id": 2, "radius": 16}).json()
  assert everything["total"] == len(served.index)


def test_search_by_upload_encodes_like_the_library(client, served):
  path = served.index.item_path(5)
  with open(path, "rb") as f:
    result = client.post("/api/search", files={"image": ("mine.png", f, "image/png")}, data={"k": "4"})
  assert result.status_code == 200, result.text
  result = result.json()
  code = served.encoder.encode(served.encoder.preprocess(images.decode(path))[None])
  assert result["hits"] == _expected(served, code, k=4)
  assert result["query"] == {"id": None, "name": "mine.png", "code": "".join("1" if c >= 0 else "0" for c in code[0])}
  radius = client.post("/api/search", files={"image": ("x.png", open(path, "rb"))}, data={"radius": "3"}).json()
  assert radius["hits"] == _expected(served, code, radius=3)


def test_item_images(client, served):
  thumb = client.get("/api/items/3/image")
  assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
  img = Image.open(io.BytesIO(thumb.content))
  assert img.format == "JPEG" and img.size == (24, 20)  # small images keep their size
  original = client.get("/api/items/3/image", params={"size": "original"})
  with open(served.index.item_path(3), "rb") as f:
    assert original.content == f.read()
  assert original.headers["content-type"] == "image/png"


def test_thumbnails_are_bounded(tmp_path, served):
  big = tmp_path / "big.png"
  data_fixtures.write_image(str(big), data_fixtures.pattern_image(0, 600, 300))
  thumb = Image.open(io.BytesIO(webapp._thumbnail(str(big))))
  assert thumb.size == (webapp.THUMB_SIZE // 2, webapp.THUMB_SIZE)


NOT_FOUND = [
    "/api/items/..%2F..%2F..%2Fetc%2Fpasswd/image", "/api/items/%2Fetc%2Fpasswd/image", "/api/items/-1/image",
    "/api/items/999/image", "/api/items/1.5/image", "/api/items/%C2%B2/image", "/api/items/cat%2F000.png/image",
    "/etc/passwd", "//etc/passwd", "/..%2F..%2Fpyproject.toml", "/web/app.js", "/app.js/..%2Findex.html",
    "/api/items/3", "/api/items/3/image/..%2F..%2F..%2Fpyproject.toml",
    "/api/items/+3/image", "/api/items/%203/image", "/api/items/%D9%A3/image"]  # what int() would read as 3


@pytest.mark.parametrize("path", NOT_FOUND)
def test_no_request_path_is_opened(client, path):
  response = client.get(path)
  assert response.status_code == 404, (path, response.text)
  assert "detail" in response.json()
  _still_serving(client)


def test_raw_dot_segments_are_not_found(served):
  """An HTTP client that sends `..` unnormalised, straight to uvicorn."""
  app = webapp.create_app(served.index, served.encoder, max_batch=4)
  with serving(app) as url:
    with httpx.Client() as http:
      for path in ("/api/items/../../../../etc/passwd", "/../../../../etc/passwd", "/api/items/../../pyproject.toml"):
        request = http.build_request("GET", url)
        request.url = request.url.copy_with(raw_path=path.encode())
        assert http.send(request).status_code == 404, path
      assert http.get(f"{url}/healthz").status_code == 200


@pytest.mark.parametrize("body", [
    {"id": 1, "k": 0}, {"id": 1, "k": -3}, {"id": 1, "k": webapp.MAX_K + 1}, {"id": 1, "k": "many"},
    {"id": 1, "k": 2.5}, {"id": 1, "radius": -1}, {"id": 1, "radius": 17}, {"id": 1, "k": 3, "radius": 2},
    {"id": 1, "kk": 3}, {"k": 3}, {"id": "x"}, [1, 2], {"id": -1}])
def test_bad_search_fields_are_422(client, body):
  response = client.post("/api/search", json=body)
  assert response.status_code == 422, (body, response.text)
  assert isinstance(response.json()["detail"], str)
  _still_serving(client)


@pytest.mark.parametrize("data", [{"k": "x"}, {"k": "0"}, {"radius": "99"}, {"k": "2", "radius": "1"}, {"id": "1"}])
def test_bad_upload_fields_are_422(client, data):
  response = client.post("/api/search", files={"image": ("a.png", _png(np.zeros((8, 8, 3), np.uint8)))}, data=data)
  assert response.status_code == 422, (data, response.text)
  _still_serving(client)


def test_unknown_id_is_404(client):
  response = client.post("/api/search", json={"id": 999})
  assert response.status_code == 404 and "no item 999" in response.json()["detail"]
  _still_serving(client)


def test_not_an_image_is_400_naming_it(client):
  response = client.post("/api/search", files={"image": ("notes.txt", b"hello, not an image", "image/png")})
  assert response.status_code == 400
  assert response.json()["detail"].startswith("notes.txt: cannot decode image")
  _still_serving(client)


@pytest.mark.parametrize("side", [20_000, 10_000])  # over twice PIL's limit (its error), and just over (its warning)
def test_decompression_bomb_is_400(client, tmp_path, side):
  path = tmp_path / "bomb.png"
  data_fixtures.write_bomb_png(str(path), side=side)
  response = client.post("/api/search", files={"image": ("bomb.png", path.read_bytes())})
  assert response.status_code == 400, response.text
  assert "bomb.png" in response.json()["detail"] and "DecompressionBomb" in response.json()["detail"]
  _still_serving(client)


def test_bad_bodies(client):
  assert client.post("/api/search", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
  assert client.post("/api/search", content=b"id=3", headers={"content-type": "text/plain"}).status_code == 415
  assert client.post("/api/search", data={"k": "3"}, files={"other": ("a", b"x")}).status_code == 422
  assert client.get("/api/items/1/image", params={"size": "huge"}).status_code == 422
  _still_serving(client)


def test_over_the_limit_is_413(client):
  big = b"\0" * (LIMIT + 1)
  response = client.post("/api/search", files={"image": ("big.png", big)})  # declares its Content-Length
  assert response.status_code == 413 and "upload limit of 1 MB" in response.json()["detail"]
  _still_serving(client)

  def chunks():  # no Content-Length: the limit holds while reading
    for _ in range(LIMIT // 65536 + 2):
      yield b"\0" * 65536

  response = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
  assert response.status_code == 413
  _still_serving(client)


def test_missing_indexed_file_is_404(client, served):
  path = served.index.item_path(17)
  os.rename(path, path + ".moved")
  try:
    response = client.get("/api/items/17/image")
    assert response.status_code == 404 and "missing" in response.json()["detail"]
  finally:
    os.rename(path + ".moved", path)
  _still_serving(client)


def test_500_leaks_nothing(client, served, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("secret internals at /home/someone/code.py")

  monkeypatch.setattr(served.index, "search", broken)
  response = client.post("/api/search", json={"id": 1})
  assert response.status_code == 500 and response.json() == {"detail": "internal server error"}
  assert "secret" not in response.text and "Traceback" not in response.text
  monkeypatch.undo()
  _still_serving(client)


def test_batcher_gathers_concurrent_calls():
  calls = []

  def fn(x):
    calls.append(len(x))
    return x * 10

  async def go(batcher, n):
    async with batcher.running():
      return await asyncio.gather(*(batcher(np.array([i])) for i in range(n)))

  out = asyncio.run(go(Batcher(fn, window_s=0.01, max_batch=8), 20))
  assert [int(o[0]) for o in out] == [10 * i for i in range(20)]  # each request gets its own row back
  assert calls == [8, 8, 4]
  calls.clear()
  asyncio.run(go(Batcher(fn, enabled=False), 5))
  assert calls == [1] * 5


def test_batcher_hands_errors_to_each_request():
  def fn(x):
    raise RuntimeError("encode failed")

  async def go():
    batcher = Batcher(fn, window_s=0.01)
    async with batcher.running():
      return await asyncio.gather(*(batcher(np.zeros(1)) for _ in range(3)), return_exceptions=True)

  assert [str(e) for e in asyncio.run(go())] == ["encode failed"] * 3


@pytest.mark.slow
def test_concurrent_uploads_share_batches(served):
  """Over real HTTP: 16 uploads at once are encoded in fewer batches, and each gets its own result."""
  app = webapp.create_app(served.index, served.encoder, batch_window_s=0.05, max_batch=8)
  uploads = [_png(demo.smooth_image(100 + i, 20, 24)) for i in range(16)]
  with serving(app) as url:
    def search(data):
      return httpx.post(f"{url}/api/search", files={"image": ("u.png", data)}, data={"k": "3"}, timeout=60).json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      results = list(pool.map(search, uploads))
    batches = httpx.get(f"{url}/api/info").json()["batcher"]["batches"]
  for data, result in zip(uploads, results):
    code = served.encoder.encode(served.encoder.preprocess(images.decode_bytes(data, "u"))[None])
    assert result["hits"] == _expected(served, code, k=3)
  assert sum(int(n) * c for n, c in batches.items()) == 16 and max(map(int, batches)) > 1, batches


def test_main_serves_the_index_with_its_own_encoder(served, monkeypatch, capsys):
  """`serve.main` in this process, up to uvicorn: the app it hands over searches the index with its encoder."""
  import uvicorn
  handed = {}
  monkeypatch.setattr(uvicorn, "run", lambda app, **kw: handed.update(app=app, **kw))
  serve.main([f"--index={served.out}", "--port=8123", "--max_batch=1"])
  assert capsys.readouterr().out.strip() == "Searching 18 items (16 bits): open http://127.0.0.1:8123/"
  assert (handed["host"], handed["port"]) == ("127.0.0.1", 8123)
  with TestClient(handed["app"]) as client:
    info = client.get("/api/info").json()
    assert (info["size"], info["step"], info["checkpoint"]) == (18, 7, served.index.info["checkpoint"])
    hits = client.post("/api/search", json={"id": 3, "k": 5}).json()["hits"]
  assert hits == _expected(served, served.index.codes_of([3]), k=5)


@pytest.mark.parametrize("args, message", [
    (["--index=/nonexistent/index"], "/nonexistent/index/index.json"),
    (["--index={out}", "--workdir=/nonexistent/work"], "/nonexistent/work/checkpoints"),
])
def test_main_errors_are_one_line(served, args, message):
  with pytest.raises(SystemExit) as e:
    serve.main([a.format(out=served.out) for a in args])
  assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and message in e.value.code
  assert "\n" not in e.value.code


@pytest.mark.slow
def test_cli_serves_the_index_with_its_own_encoder(served):
  port = demo.free_port()
  proc = helpers.serve_cli(f"--index={served.out}", f"--port={port}", "--max_batch=1")
  try:
    line = proc.stdout.readline()
    assert line.strip() == f"Searching 18 items (16 bits): open http://127.0.0.1:{port}/", (line, proc.stderr)
    deadline = time.monotonic() + 120
    while True:  # the URL is printed before uvicorn binds
      try:
        info = httpx.get(f"http://127.0.0.1:{port}/api/info").json()
        break
      except httpx.TransportError:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    assert (info["size"], info["step"], info["checkpoint"]) == (18, 7, served.index.info["checkpoint"])
    hits = httpx.post(f"http://127.0.0.1:{port}/api/search", json={"id": 3, "k": 5}).json()["hits"]
    assert hits == _expected(served, served.index.codes_of([3]), k=5)
  finally:
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--index=/nonexistent/index"], "/nonexistent/index/index.json"),
    (["--index={out}", "--workdir=/nonexistent/work"], "/nonexistent/work/checkpoints"),
])
def test_cli_errors_are_one_line(served, args, message):
  proc = helpers.serve_cli(*(a.format(out=served.out) for a in args))
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 1 and "Traceback" not in err, err
  assert err.strip().splitlines()[-1].startswith("error: ") and message in err, err
