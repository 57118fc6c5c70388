"""``lrm-rt serve``: an HTTP server that keeps one model loaded and turns posted images into meshes.

    POST /reconstruct?format=glb&mc_resolution=256&faces=20000&texture=1024   body: the image file's bytes
        -> 200, the mesh file (glb, obj or ply; textured meshes as glb), seconds per stage in X-Lrm-Timings and
           preprocessing warnings (if any) in X-Lrm-Warnings, both JSON
    GET /health -> 200, JSON with the model and backends

Errors are JSON ``{"error": "..."}``: 400 for a bad image or parameter (the same one-line messages as the CLI),
411 / 413 for a missing or too large body, 404 / 405 for other paths / methods, 503 when memory runs or would
run out, 500 otherwise. One request at a time is decoded and reconstructed (the others queue), so the working
memory is that of one; a queued request holds only its compressed body (at most ``max_body`` bytes), and at most
``max_queue`` requests are admitted at once (later ones get 503 with Retry-After before their body is kept). A
client that stalls for ``SOCKET_TIMEOUT_S`` is dropped. Standard library only; it binds to localhost unless told
otherwise, and has no authentication: put it behind a proxy to expose it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
import traceback
from argparse import ArgumentTypeError
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from .cli import finite, int_in
from .errors import ConfigError, LrmError, ResourceError, is_out_of_memory
from .mesh import FORMATS, empty_mesh_error, mesh_bytes
from .pipeline import Reconstructor
from .preprocess import MAX_IMAGE_FILE_BYTES, decode_image
from .texture import MAX_SIZE as MAX_TEXTURE, MIN_SIZE as MIN_TEXTURE

DRAIN_LIMIT = 64 << 20  # an oversized body up to this much more is read before the 413 is sent
# The CLI bakes up to MAX_TEXTURE; one request of 8192^2 took 6 GB and a minute under the lock, so the server
# stops at 4096^2 (1.8 GB, ~20 s on 2 cores).
MAX_SERVED_TEXTURE = min(4096, MAX_TEXTURE)
MAX_QUEUE = 8  # requests admitted at once (one running, the others' bodies waiting)
CONTENT_TYPES = {"glb": "model/gltf-binary", "obj": "model/obj", "ply": "application/octet-stream"}


def _choice(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in names:
            raise ArgumentTypeError(f"must be one of {', '.join(names)}")
        return text
    return parse


# query parameter -> parser; the ranges are the CLI's
PARAMETERS: Dict[str, Callable[[str], object]] = {
    "format": _choice(*FORMATS), "orientation": _choice("native", "y_up"), "mc_resolution": int_in(2, 4096),
    "mc_threshold": finite, "faces": int_in(4, 1 << 30), "texture": int_in(MIN_TEXTURE, MAX_SERVED_TEXTURE),
    "foreground_ratio": finite, "vertex_colors": _choice("0", "1"),
}


def parse_parameters(query: str) -> Dict[str, object]:
    params: Dict[str, object] = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key not in PARAMETERS:
            raise ConfigError(f"unknown parameter {key!r} (known: {', '.join(PARAMETERS)})")
        if len(values) != 1:
            raise ConfigError(f"parameter {key!r} given {len(values)} times")
        try:
            params[key] = PARAMETERS[key](values[0])
        except ArgumentTypeError as e:
            raise ConfigError(f"parameter {key}={values[0]!r}: {e}") from None
    if params.get("texture") and params.get("format", "glb") != "glb":
        raise ConfigError(f"a textured mesh is served as glb only, not {params['format']} (obj would be three "
                          f"files, ply holds no texture image)")
    return params


SOCKET_TIMEOUT_S = 120

class ReconstructionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: Tuple[str, int], reconstructor: Reconstructor,
                 max_body: int = MAX_IMAGE_FILE_BYTES, quiet: bool = False, max_queue: int = MAX_QUEUE):
        if max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
        super().__init__(address, _Handler)
        self.reconstructor = reconstructor
        self.max_body = max_body
        self.max_queue = max_queue
        self.quiet = quiet
        self.lock = threading.Lock()  # one reconstruction at a time
        self.slots = threading.BoundedSemaphore(max_queue)  # bounds the bodies held: max_queue x max_body

    def reconstruct(self, image: bytes, params: Dict[str, object]) -> Tuple[bytes, str, Dict[str, float], list]:
        """(mesh file bytes, format, seconds per stage, warnings: the result's and those the library logged)"""
        with self.lock, _logged_warnings() as logged:  # decoding too: a decoded image can be 1000x its body
            t0 = time.perf_counter()
            rgba = decode_image(image, "<request body>")
            del image
            rec = self.reconstructor
            pre = rec.preprocess(rgba, params.get("foreground_ratio"))  # type: ignore[arg-type]
            del rgba
            decode_and_preprocess = time.perf_counter() - t0
            res = rec.reconstruct(pre, mc_resolution=params.get("mc_resolution"),  # type: ignore[arg-type]
                                  mc_threshold=params.get("mc_threshold"),  # type: ignore[arg-type]
                                  vertex_colors=params.get("vertex_colors", "1") == "1",
                                  target_faces=params.get("faces", 0),  # type: ignore[arg-type]
                                  texture_size=params.get("texture", 0))  # type: ignore[arg-type]
        if res.mesh is None:
            raise LrmError("no mesh was made")
        if res.mesh.num_faces == 0:
            raise empty_mesh_error(res.mesh)
        fmt = str(params.get("format", "glb"))
        data = mesh_bytes(res.mesh, fmt, params.get("orientation", "native"))  # type: ignore[arg-type]
        return data, fmt, {**res.timings, "preprocess": decode_and_preprocess}, logged + res.warnings


class _WarningCollector(logging.Handler):
    """Keeps the messages of one thread's warnings. Where nothing else handles the library's records (no logging
    set up), it also passes them to logging's last-resort stderr handler, which its presence would switch off."""

    def __init__(self, thread: int, forward: bool):
        super().__init__(logging.WARNING)
        self.thread, self.forward, self.messages = thread, forward, []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())
        if self.forward and logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


@contextlib.contextmanager
def _logged_warnings() -> Iterator[List[str]]:
    """Warnings the library logs in this thread meanwhile (an animation's first frame taken, a damaged EXIF block,
    NaN pixels), for the client's X-Lrm-Warnings header; they still reach the server's log as before."""
    log = logging.getLogger("lrm_rt")
    collector = _WarningCollector(threading.get_ident(), forward=not log.hasHandlers())
    log.addHandler(collector)
    try:
        yield collector.messages
    finally:
        log.removeHandler(collector)


class _Handler(BaseHTTPRequestHandler):
    server: ReconstructionServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S  # a client that stalls mid-request or never reads its answer is dropped

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:  # say so, or an HTTP/1.1 client sends its next request into a closed socket
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer is the headers alone
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client left without its answer: nobody to tell
            self.close_connection = True

    def _json(self, status: int, doc: dict, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(doc).encode() + b"\n", "application/json", headers)

    def _refuse(self, length: int, status: int, error: str, headers: Optional[Dict[str, str]] = None) -> None:
        """Answer without using the body. Read (and drop) it first when it is not huge: closing a connection with
        unread data resets it, and a client still sending would see that instead of this answer."""
        self.close_connection = True
        if length <= self.server.max_body + DRAIN_LIMIT:
            for left in range(length, 0, -(1 << 20)):
                self.rfile.read(min(left, 1 << 20))
        self._json(status, {"error": error}, headers)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if urlsplit(self.path).path != "/health":
            self._json(404, {"error": f"no such path: {urlsplit(self.path).path} (GET /health, POST /reconstruct)"})
            return
        rec = self.server.reconstructor
        self._json(200, {"status": "ok", "model": rec.config.name, "family": rec.config.family,
                         "version": rec.config.version, "network_backend": rec.network.name,
                         "field_backend": rec.field.name})

    def _not_allowed(self) -> None:
        """Other methods: a JSON 405 naming the two that exist (http.server would answer 501 with an HTML page).
        A body the client sent is not read, so the connection closes."""
        self.close_connection = True
        self._json(405, {"error": f"method {self.command} not allowed (GET /health, POST /reconstruct)"},
                   {"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):  # "²".isdigit() is True
            self.close_connection = True
            self._json(411, {"error": "POST the image file as the body, with a Content-Length"})
            return
        if len(length.lstrip("0")) > 18:  # over any limit, and int() refuses 4300 digits
            self.close_connection = True
            self._json(413, {"error": f"image of a {len(length)}-digit length is over the limit of "
                                      f"{self.server.max_body} bytes"})
            return
        if url.path != "/reconstruct":
            self._refuse(int(length), 404, f"no such path: {url.path} (POST /reconstruct)")
            return
        if int(length) > self.server.max_body:
            self._refuse(int(length), 413, f"image of {length} bytes is over the limit of {self.server.max_body}")
            return
        if not self.server.slots.acquire(blocking=False):
            self._refuse(int(length), 503, f"busy: {self.server.max_queue} requests are already queued or running; "
                         "retry later", {"Retry-After": "5"})
            return
        try:
            body = self.rfile.read(int(length))
        except OSError:  # stalled past SOCKET_TIMEOUT_S or reset mid-upload: closed quietly, as http.server does
            body = b""
        if len(body) < int(length):  # the client closed before sending what it announced: nothing to answer
            self.server.slots.release()
            self.close_connection = True
            return
        try:
            try:
                data, fmt, timings, warnings = self.server.reconstruct(body, parse_parameters(url.query))
            finally:
                del body  # before the answer is sent: a slow reader holds neither a slot nor the body
                self.server.slots.release()
        except ResourceError as e:  # the request is valid, this machine lacks the memory for it (checked up front)
            self._json(503, {"error": str(e)})
        except LrmError as e:
            self._json(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 (a server answers every request)
            first = (str(e).splitlines() or [""])[0][:200]
            if is_out_of_memory(e):
                self._json(503, {"error": f"out of memory ({first or type(e).__name__}); try a smaller mc_resolution"})
            else:
                traceback.print_exc()
                self._json(500, {"error": f"internal error: {type(e).__name__}: {first}"})
        else:
            headers = {"X-Lrm-Timings": json.dumps({k: round(v, 4) for k, v in timings.items()})}
            if warnings:  # header values are one line of Latin-1: JSON's ASCII escapes keep them so
                headers["X-Lrm-Warnings"] = json.dumps(warnings)
            self._send(200, data, CONTENT_TYPES[fmt], headers)


def serve(reconstructor: Reconstructor, host: str = "127.0.0.1", port: int = 8080, quiet: bool = False,
          max_queue: int = MAX_QUEUE) -> None:
    server = ReconstructionServer((host, port), reconstructor, quiet=quiet, max_queue=max_queue)
    print(f"serving {reconstructor.config.name} on http://{server.server_address[0]}:{server.server_address[1]} "
          "(POST /reconstruct, GET /health; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
