"""The search web app over a `HammingIndex` and an `Encoder` (`python -m hybridhash_jax.serve` runs it).

Routes (JSON unless noted; docs/serving.md documents them):
  GET  /  /app.js  /style.css    the page (hybridhash_jax/web/, read once here: no request path is opened)
  POST /api/search               a multipart `image`, or JSON {"id": N}; plus `k` or `radius`
  GET  /api/items/{id}/image     a JPEG thumbnail, or with ?size=original the indexed file itself
  GET  /api/info                 index size, bits, model, checkpoint and step, the index version, the batcher's settings
  GET  /healthz
Only indexed files are served, by id. Errors are {"detail": message}: 400 (not an image, a decompression
bomb), 404 (unknown id or path), 413 (body over the limit), 415, 422 (bad id, k or radius), 503 with
Retry-After (`max_inflight` uploads already in work), and a 500 that names no internals. Uploads are
decoded in a thread and encoded through the `Batcher`. The index is a `LiveIndex`: each request
searches the one current when it started, and a newly committed index replaces it for later requests.
"""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.resources
import io
import os
from typing import Literal

import fastapi
from fastapi import responses
from fastapi.concurrency import run_in_threadpool
import numpy as np
from PIL import Image
import pydantic
import starlette.datastructures
from starlette.requests import ClientDisconnect

from hybridhash_jax.batcher import Batcher
from hybridhash_jax.data import images
from hybridhash_jax.live_index import LiveIndex

DEFAULT_K = 20
MAX_K = 1000  # also the most hits a radius search returns (its `total` counts them all)
THUMB_SIZE = 256
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
PAGE_FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
              "/style.css": ("style.css", "text/css")}


class SearchParams(pydantic.BaseModel):
  """The fields of a search besides the image: JSON keys, or the multipart form's other fields."""
  model_config = pydantic.ConfigDict(extra="forbid")
  id: int | None = pydantic.Field(None, ge=0)
  k: int | None = pydantic.Field(None, ge=1, le=MAX_K)
  radius: int | None = pydantic.Field(None, ge=0)


def _error(status: int, detail: str) -> responses.JSONResponse:
  return responses.JSONResponse({"detail": detail}, status_code=status)


class _BodyLimit:
  """ASGI middleware: a request body over `limit` bytes gets 413, by its Content-Length before reading and
  by counting while reading (a chunked upload has none)."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = dict(scope["headers"]).get(b"content-length", b"0")
    if not length.isdigit() or int(length) > self.limit:
      return await _error(413, self._detail())(scope, receive, send)
    seen = 0

    async def limited_receive():
      nonlocal seen
      message = await receive()
      seen += len(message.get("body", b""))
      if seen > self.limit:
        raise fastapi.HTTPException(413, self._detail())
      return message

    return await self.app(scope, limited_receive, send)

  def _detail(self) -> str:
    return f"request body over the upload limit of {self.limit / 2**20:g} MB"


class _Inflight:
  """At most `limit` uploads in work at once; one more is refused at once (503), not queued, so that
  neither memory nor latency grows without bound under load. Used on the event loop only."""

  def __init__(self, limit: int):
    if limit < 1:
      raise ValueError(f"max_inflight must be >= 1, got {limit}")
    self.limit, self.busy = limit, 0

  @contextlib.contextmanager
  def slot(self):
    if self.busy >= self.limit:
      raise fastapi.HTTPException(503, f"busy: {self.limit} uploads are in work, retry in {RETRY_AFTER_S} s",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
    self.busy += 1
    try:
      yield
    finally:
      self.busy -= 1


def _parse_params(fields: dict) -> SearchParams:
  try:
    return SearchParams.model_validate(fields)
  except pydantic.ValidationError as e:
    raise fastapi.HTTPException(422, "; ".join(
        f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())) from None


def _search_args(params: SearchParams, bits: int) -> dict:
  if params.k is not None and params.radius is not None:
    raise fastapi.HTTPException(422, "give k or radius, not both")
  if params.radius is None:
    return {"k": DEFAULT_K if params.k is None else params.k}
  if params.radius > bits:
    raise fastapi.HTTPException(422, f"radius: must be between 0 and the code length {bits}, got {params.radius}")
  return {"radius": params.radius}


def _decode_upload(data: bytes, name: str) -> np.ndarray:
  """400 naming the upload if it is not an image, or has more pixels than PIL's decompression-bomb limit
  (PIL refuses twice that itself, but only warns below; a server refuses both, before decoding)."""
  try:
    with Image.open(io.BytesIO(data)) as img:  # the header only
      pixels = img.width * img.height
  except Exception:  # noqa: BLE001  # decode_bytes names the problem below
    pixels = 0
  try:
    if pixels > Image.MAX_IMAGE_PIXELS:
      raise images.BadImageError(f"{name}: refused, {pixels} pixels could be a decompression bomb "
                                 f"(DecompressionBombWarning: over PIL's limit of {Image.MAX_IMAGE_PIXELS})")
    return images.decode_bytes(data, name)
  except images.BadImageError as e:
    raise fastapi.HTTPException(400, str(e)) from None


def _bit_string(bits: np.ndarray) -> str:
  return "".join("1" if b else "0" for b in bits)


def _thumbnail(path: str) -> bytes:
  img = Image.fromarray(images.decode(path))
  img.thumbnail((THUMB_SIZE, THUMB_SIZE))
  out = io.BytesIO()
  img.save(out, "JPEG", quality=85)
  return out.getvalue()


def create_app(index, encoder, *, max_upload_bytes: int = 10 * 2**20, batch_window_s: float = 0.003,
               max_batch: int = 32, batching: bool = True, max_inflight: int = 32, reload_s: float | None = None,
               thumbnail_cache: int = 1024) -> fastapi.FastAPI:
  """The app for `index` (a `HammingIndex`) searched with `encoder` (an `Encoder` the index was built with).

  `batch_window_s` and `max_batch` set the batcher (`batching=False`: each upload encoded alone);
  `max_inflight` bounds the uploads read, decoded and encoded at once. The index's directory is
  checked for a new commit every `reload_s` seconds (None: only on `app.state.live.wake()`).
  """
  web = importlib.resources.files("hybridhash_jax") / "web"
  pages = {route: (web.joinpath(name).read_bytes(), media) for route, (name, media) in PAGE_FILES.items()}
  batcher = Batcher(encoder.encode, window_s=batch_window_s, max_batch=max_batch, enabled=batching)
  inflight = _Inflight(max_inflight)
  live = LiveIndex(index, encoder, reload_s)
  # Keyed by the file's mtime too: a rebuilt index may list a changed file under its old path.
  thumbnail = functools.lru_cache(maxsize=thumbnail_cache)(lambda path, mtime: _thumbnail(path))

  @contextlib.asynccontextmanager
  async def lifespan(_):
    # Compile the batch shapes before the first request (and fail at start if the encoder cannot run).
    for n in [2**i for i in range((max_batch - 1).bit_length() + 1)] if batching else [1]:
      await run_in_threadpool(encoder.encode, np.zeros((n, encoder.img_size, encoder.img_size, 3), np.uint8))
    with live.watching():
      async with batcher.running():
        yield

  app = fastapi.FastAPI(title="hybridhash-jax search", lifespan=lifespan, docs_url=None, redoc_url=None,
                        openapi_url=None)
  app.state.live = live
  app.add_middleware(_BodyLimit, limit=max_upload_bytes)

  @app.exception_handler(ClientDisconnect)
  async def client_gone(request, exc):  # mid-upload: the form parser has closed its files; no one reads this
    return responses.Response(status_code=400)

  @app.exception_handler(Exception)
  async def internal_error(request, exc):  # the traceback goes to the log only
    return _error(500, "internal server error")

  def page(route):
    body, media = pages[route]
    return lambda: responses.Response(body, media_type=media)

  for route in pages:
    app.get(route, include_in_schema=False)(page(route))

  @app.get("/healthz")
  def healthz():
    return {"status": "ok"}

  @app.get("/api/info")
  def info():
    loaded = live.current
    index = loaded.index
    return {"size": len(index), "bits": index.bits, "model": encoder.info.get("model"),
            "checkpoint": encoder.info.get("checkpoint"), "step": encoder.info.get("step"),
            "max_upload_mb": max_upload_bytes / 2**20, "max_k": MAX_K, "default_k": DEFAULT_K,
            "batcher": {"enabled": batching, "window_ms": batch_window_s * 1e3, "max_batch": max_batch,
                        "batches": {str(n): c for n, c in sorted(batcher.batch_counts.items())}},
            "uploads": {"max_inflight": inflight.limit, "inflight": inflight.busy},
            "version": loaded.describe(),
            "reload": {"every_s": live.reload_s, "reloads": live.reloads, "refused": live.refused},
            "index": index.info}

  def item(index, item_id: int | str) -> dict:
    try:
      return index.item(int(item_id))
    except (KeyError, ValueError):
      raise fastapi.HTTPException(404, f"no item {item_id} in the index ({len(index)} items)") from None

  @app.post("/api/search")
  async def search(request: fastapi.Request):
    loaded = live.current
    index = loaded.index
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
      with inflight.slot():
        async with request.form(max_files=1, max_fields=8) as form:  # closes the spooled upload at the end
          upload = form.get("image")
          if not isinstance(upload, starlette.datastructures.UploadFile):
            raise fastapi.HTTPException(422, "image: a multipart search needs a file field `image`")
          params = _parse_params({key: value for key, value in form.items() if key != "image"})
          if params.id is not None:
            raise fastapi.HTTPException(422, "give an image or an id, not both")
          args = _search_args(params, index.bits)
          name = os.path.basename(upload.filename or "upload")
          data = await upload.read()
        image = await run_in_threadpool(lambda: encoder.preprocess(_decode_upload(data, name)))
        del data  # only the small preprocessed image waits for its batch
        code = await batcher(image)
      query, codes, bits = {"id": None, "name": name}, code[None], code >= 0
    elif kind == "application/json":
      try:
        body = await request.json()
      except ValueError:
        raise fastapi.HTTPException(400, "the body is not valid JSON") from None
      params = _parse_params(body if isinstance(body, dict) else {"body": body})
      if params.id is None:
        raise fastapi.HTTPException(422, "id: a JSON search needs the id of an indexed item")
      args = _search_args(params, index.bits)
      query = {"id": params.id, "name": item(index, params.id)["path"]}
      codes = index.codes_of([params.id])
      bits = np.unpackbits(codes[0], bitorder="little")[:index.bits]
    else:
      raise fastapi.HTTPException(415, "send a multipart form with an `image` file, or JSON {\"id\": N}")
    hits = (await run_in_threadpool(index.search, codes, **args))[0]
    return {"query": {**query, "code": _bit_string(bits)}, **args, "total": len(hits),
            "hits": [dataclasses.asdict(hit) for hit in hits[:MAX_K]], "version": loaded.version}

  @app.get("/api/items/{item_id}/image")
  async def item_image(request: fastapi.Request, item_id: str, size: Literal["thumb", "original"] = "thumb"):
    index = live.current.index
    if not item_id.isascii() or not item_id.isdigit():  # ids only: nothing else in a request names a file
      raise fastapi.HTTPException(404, f"no item {item_id!r}: items are named by their id")
    entry, path = item(index, item_id), index.item_path(int(item_id))
    if not os.path.isfile(path):
      raise fastapi.HTTPException(404, f"item {item_id}: its file {entry['path']} is missing")
    if size == "original":
      return responses.FileResponse(path, headers={"Cache-Control": "no-cache"})
    # A rebuilt index renumbers its items: a browser revalidates an id's thumbnail against its file each time.
    headers = {"Cache-Control": "no-cache", "ETag": '"' + hashlib.sha1(
        f"{entry['path']}\0{entry['size']}\0{entry['mtime']}".encode("utf-8")).hexdigest()[:20] + '"'}
    if request.headers.get("if-none-match") == headers["ETag"]:
      return responses.Response(status_code=304, headers=headers)
    try:
      data = await run_in_threadpool(thumbnail, path, entry["mtime"])
    except images.BadImageError:
      raise fastapi.HTTPException(404, f"item {item_id}: its file {entry['path']} cannot be read") from None
    return responses.Response(data, media_type="image/jpeg", headers=headers)

  return app
