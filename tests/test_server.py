"""``lrm-rt serve`` (lrm_rt.server): a real server on a free port, driven over HTTP with the standard library."""
from __future__ import annotations

import http.client
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import trimesh

from lrm_rt.errors import ConfigError
from lrm_rt.pipeline import Reconstructor
from lrm_rt.server import ReconstructionServer

REPO = Path(__file__).resolve().parents[1]
CHAIR = (REPO / "examples" / "chair.png").read_bytes()


@pytest.fixture(scope="module")
def server():
    rec = Reconstructor("lrm-tiny")
    srv = ReconstructionServer(("127.0.0.1", 0), rec, max_body=len(CHAIR) * 4, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*server.server_address, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_reconstruct_returns_the_cli_mesh(server, tmp_path):
    status, headers, body = _request(server, "POST", "/reconstruct?mc_resolution=64", CHAIR)
    assert status == 200 and headers["Content-Type"] == "model/gltf-binary"
    assert {"preprocess", "transformer", "marching_cubes"} <= set(json.loads(headers["X-Lrm-Timings"]))
    got = trimesh.load(io.BytesIO(body), file_type="glb", force="mesh", process=False)
    from lrm_rt.cli import main

    assert main(["reconstruct", str(REPO / "examples" / "chair.png"), "--out", str(tmp_path / "c.glb"),
                 "--mc-resolution", "64", "--precision", "fp32", "--quiet"]) == 0
    ref = trimesh.load(tmp_path / "c.glb", force="mesh", process=False)
    np.testing.assert_array_equal(got.faces, ref.faces)
    np.testing.assert_allclose(got.vertices, ref.vertices, atol=1e-5)


def test_formats_texture_and_health(server):
    status, headers, body = _request(server, "POST", "/reconstruct?mc_resolution=32&format=obj&faces=300", CHAIR)
    assert status == 200 and b"\nv " in b"\n" + body
    assert 0 < body.count(b"\nf ") <= 300
    status, _, body = _request(server, "POST", "/reconstruct?mc_resolution=32&texture=64", CHAIR)
    doc = json.loads(body[20:20 + int.from_bytes(body[12:16], "little")])
    assert status == 200 and "TEXCOORD_0" in doc["meshes"][0]["primitives"][0]["attributes"]
    status, _, body = _request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["model"] == "lrm-tiny"


@pytest.mark.parametrize("path,body,status,pattern", [
    ("/reconstruct", b"not an image", 400, "not a recognised image file"),
    ("/reconstruct", b"", 400, "image is empty"),
    ("/reconstruct?mc_resolution=1", CHAIR, 400, "mc_resolution='1': must be in"),
    ("/reconstruct?colour=red", CHAIR, 400, "unknown parameter 'colour'"),
    ("/reconstruct?format=ply&texture=256", CHAIR, 400, "served as glb only, not ply"),
    ("/reconstruct?format=obj&texture=256", CHAIR, 400, "served as glb only, not obj (obj would be three files"),
    ("/reconstruct?format=ply&format=glb", CHAIR, 400, "given 2 times"),
    ("/reconstruct?texture=8192", CHAIR, 400, "texture='8192': must be in"),  # the CLI's limit; 6 GB per request
    ("/reconstruct?mc_threshold=1e9", CHAIR, 400, "stays below the level 1e+09 everywhere"),
    ("/elsewhere", CHAIR, 404, "no such path"),
    ("/reconstruct", CHAIR * 5, 413, "over the limit"),
])
def test_bad_requests_get_one_line_json_errors(server, path, body, status, pattern):
    got, headers, text = _request(server, "POST", path, body)
    assert got == status and headers["Content-Type"] == "application/json"
    assert pattern in json.loads(text)["error"]


def test_keep_alive_connection_survives_errors(server):
    # one HTTP/1.1 connection: a refused request must not leave its body behind to be read as the next request
    conn = http.client.HTTPConnection(*server.server_address, timeout=120)
    try:
        for path, body, status in [("/elsewhere", b"x" * 5000, 404), ("/reconstruct?colour=red", CHAIR, 400),
                                   ("/reconstruct?mc_resolution=32", CHAIR, 200)]:
            if conn.sock is None:
                conn.connect()
            conn.request("POST", path, body=body)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == status
            if resp.will_close:
                conn.close()
    finally:
        conn.close()


def test_missing_length_and_internal_errors(server, monkeypatch, capsys):
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)
    conn.putrequest("POST", "/reconstruct")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)  # "²".isdigit() is True, int("²") fails
    conn.putrequest("POST", "/reconstruct")
    conn.putheader("Content-Length", "\u00b2")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411, resp.status
    conn.close()

    # a valid request this machine has not the memory for (a 4096^3 grid: 275 GB), refused before allocating
    status, _, text = _request(server, "POST", "/reconstruct?mc_resolution=4096", CHAIR)
    assert status == 503 and "lower the resolution" in json.loads(text)["error"], text

    def boom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
    monkeypatch.setattr(server.reconstructor, "reconstruct", boom)
    status, _, text = _request(server, "POST", "/reconstruct", CHAIR)
    assert status == 503 and "out of memory" in json.loads(text)["error"]
    monkeypatch.setattr(server.reconstructor, "reconstruct", lambda *a, **k: 1 / 0)
    status, _, text = _request(server, "POST", "/reconstruct", CHAIR)
    assert status == 500 and json.loads(text)["error"].startswith("internal error: ZeroDivisionError")


def test_concurrent_requests_are_served_one_at_a_time(server, monkeypatch):
    active, peak = [0], [0]
    real = server.reconstructor.reconstruct

    def counted(*a, **k):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            return real(*a, **k)
        finally:
            active[0] -= 1
    monkeypatch.setattr(server.reconstructor, "reconstruct", counted)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        _request(server, "POST", "/reconstruct?mc_resolution=32", CHAIR)[0])) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200] and peak[0] == 1


def test_images_are_decoded_one_at_a_time(server, monkeypatch):
    """A decoded image can be 1000x its compressed body (an 8000^2 PNG of 1 MB: 256 MB), so decoding happens
    under the reconstruction lock: queued requests hold only their bodies."""
    import lrm_rt.server as srv

    held = []
    real = srv.decode_image

    def decode(*a, **k):
        held.append(server.lock.locked())
        return real(*a, **k)

    monkeypatch.setattr(srv, "decode_image", decode)
    status, _, _ = _request(server, "POST", "/reconstruct?mc_resolution=16", CHAIR)
    assert status == 200 and held == [True]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD"])
def test_other_methods_get_a_json_405(server, method):
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)
    conn.request(method, "/reconstruct", body=b"x" if method != "HEAD" else None)
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 405 and resp.getheader("Allow") == "GET, POST"
    if method != "HEAD":
        assert "not allowed" in json.loads(body)["error"]
    conn.close()


def test_requests_beyond_the_queue_get_503_and_every_slot_comes_back(monkeypatch):
    """Each admitted request holds its body while it waits; beyond max_queue the server answers 503 with
    Retry-After instead of buffering without bound, and failed requests give their slot back too."""
    rec = Reconstructor("lrm-tiny")
    srv = ReconstructionServer(("127.0.0.1", 0), rec, max_body=len(CHAIR) * 4, quiet=True, max_queue=2)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        release, entered = threading.Event(), threading.Semaphore(0)
        real = srv.reconstruct

        def slow(*a, **k):
            entered.release()
            release.wait(60)
            return real(*a, **k)
        monkeypatch.setattr(srv, "reconstruct", slow)
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            _request(srv, "POST", "/reconstruct?mc_resolution=16", CHAIR)[0])) for _ in range(2)]
        for t in threads:
            t.start()
        for _ in threads:  # both admitted: their slots are taken
            assert entered.acquire(timeout=60)
        status, headers, body = _request(srv, "POST", "/reconstruct?mc_resolution=16", CHAIR)
        assert status == 503 and headers.get("Retry-After") == "5" and b"busy: 2 requests" in body
        release.set()
        for t in threads:
            t.join()
        assert results == [200, 200]
        monkeypatch.setattr(srv, "reconstruct", real)
        for _ in range(3):  # bad requests (400) return their slots: later ones are still admitted
            assert _request(srv, "POST", "/reconstruct", b"not an image")[0] == 400
        assert _request(srv, "POST", "/reconstruct?mc_resolution=16", CHAIR)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(ConfigError, match="max_queue"):
        ReconstructionServer(("127.0.0.1", 0), rec, max_queue=0)


def test_a_stalled_upload_is_dropped_quietly_and_frees_its_slot(monkeypatch, capsys):
    """A client that sends part of its body and stalls is dropped after the socket timeout, as http.server does
    (reading the body inside the request's error handling had turned it into a 500 and two tracebacks)."""
    import socket

    import lrm_rt.server as S

    monkeypatch.setattr(S._Handler, "timeout", 1)
    rec = Reconstructor("lrm-tiny")
    srv = ReconstructionServer(("127.0.0.1", 0), rec, max_body=len(CHAIR) * 4, quiet=True, max_queue=1)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(srv.server_address, timeout=30) as s:
            s.sendall(b"POST /reconstruct HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            answer = s.recv(4096)  # the server closes after its 1 s timeout
        assert answer == b""
        assert "Traceback" not in capsys.readouterr().err
        assert _request(srv, "POST", "/reconstruct?mc_resolution=16", CHAIR)[0] == 200  # its one slot came back
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_body_cut_short_is_not_decoded_and_a_vanished_client_prints_no_traceback(server, monkeypatch, capsys):
    """A client that announces more bytes than it sends and closes is dropped without decoding the part it sent
    (which once came back as a 400 about the image, into a closed socket: BrokenPipeError's traceback); an answer
    that finds the client gone is dropped quietly too."""
    import socket

    import lrm_rt.server as S

    calls = []
    monkeypatch.setattr(server, "reconstruct", lambda body, params: calls.append(len(body)) or pytest.fail("decoded"))
    with socket.create_connection(server.server_address, timeout=30) as s:
        s.sendall(b"POST /reconstruct HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(CHAIR) * 2)
                  + CHAIR[:1000])
        s.shutdown(socket.SHUT_WR)
        assert s.recv(4096) == b""  # closed, no answer
    monkeypatch.undo()
    assert calls == []

    def gone(self):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(S._Handler, "end_headers", gone)
    with socket.create_connection(server.server_address, timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096) == b""  # nothing went out: the headers are sent by end_headers
    monkeypatch.undo()
    assert "Traceback" not in capsys.readouterr().err
    assert _request(server, "GET", "/health")[0] == 200


def test_warnings_the_library_logs_reach_the_client(server):
    """An animation's "using the first frame" is logged while decoding, not returned with the result: it went to
    the server's stderr only, while X-Lrm-Warnings promises the client every preprocessing warning."""
    from PIL import Image

    im = Image.open(io.BytesIO(CHAIR)).convert("RGBA")
    buf = io.BytesIO()
    im.save(buf, format="GIF", save_all=True, append_images=[im.rotate(90)], duration=100)
    status, headers, _ = _request(server, "POST", "/reconstruct?mc_resolution=16", buf.getvalue())
    assert status == 200
    assert any("has 2 frames" in w for w in json.loads(headers.get("X-Lrm-Warnings", "[]"))), headers


def _animated_gif() -> bytes:
    from PIL import Image

    im = Image.open(io.BytesIO(CHAIR)).convert("RGBA")
    buf = io.BytesIO()
    im.save(buf, format="GIF", save_all=True, append_images=[im.rotate(90)], duration=100)
    return buf.getvalue()


def test_warnings_reach_clients_of_a_quiet_server_and_stderr_without_logging_setup(server, monkeypatch, capsys):
    """`serve --quiet` (no request log) still hands warnings to clients: main() silences its stderr handler, not
    the records. A server started from Python with no logging set up still prints them (logging's last resort,
    which the collecting handler would otherwise switch off)."""
    import logging
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lrm_rt.cli", "serve", "--port", "0", "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = int(re.search(r":(\d+) ", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/reconstruct?mc_resolution=16", body=_animated_gif())
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and "has 2 frames" in (resp.getheader("X-Lrm-Warnings") or ""), resp.getheaders()
    finally:
        proc.terminate()
        proc.wait(30)
    log = logging.getLogger("lrm_rt")
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(log, "handlers", [])
    assert not log.hasHandlers()
    capsys.readouterr()
    status, headers, _ = _request(server, "POST", "/reconstruct?mc_resolution=16", _animated_gif())
    assert status == 200 and "has 2 frames" in headers.get("X-Lrm-Warnings", "")
    assert "has 2 frames" in capsys.readouterr().err


def test_a_content_length_of_thousands_of_digits_is_413_not_a_traceback(server, capsys):
    """int() refuses strings over 4300 digits (ValueError inside the handler: a traceback, no answer)."""
    import socket

    with socket.create_connection(server.server_address, timeout=30) as s:
        s.sendall(b"POST /reconstruct HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and b"5000-digit length is over the limit" in answer, answer
    assert "Traceback" not in capsys.readouterr().err
