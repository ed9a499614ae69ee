"""A local HTTP server (127.0.0.1 only) serving test images and failure cases for the image
fetching and server tests."""

from __future__ import annotations

import io
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def make_images(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB")
    gray = Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (32, 24, 4), dtype=np.uint8), "RGBA")
    jpeg = encode(rgb, "JPEG")
    # 1-bit image: 6000x6000 pixels in a few kB (a decompression bomb for a small pixel cap).
    bomb = encode(Image.new("1", (6000, 6000)), "PNG")
    return {
        "/rgb.jpg": jpeg,
        "/rgb.png": encode(rgb, "PNG"),
        "/gray.png": encode(gray, "PNG"),
        "/rgba.png": encode(rgba, "PNG"),
        "/truncated.jpg": jpeg[: len(jpeg) // 2],
        "/bomb.png": bomb,
        "/notimage.png": b"<html>this is not an image</html>",
    }


class ImageServer:
    """Paths: the images of make_images(); /missing.png (404); /slow.png?s=SECONDS (sleeps
    before answering); /big.bin?n=BYTES (with Content-Length) and /big-chunked.bin?n=BYTES
    (chunked, no length); /redirect/N (N hops, then /rgb.png); /redirect-to?url=URL."""

    def __init__(self):
        self.images = make_images()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, ctype: str = "image/png", extra=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the fetcher gave up (timeout, size limit): expected

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                path = parts.path
                if path in server.images:
                    self._send(200, server.images[path])
                elif path == "/slow.png":
                    deadline = time.monotonic() + float(query.get("s", "30"))
                    while time.monotonic() < deadline and not server.stopping.is_set():
                        time.sleep(0.05)
                    self._send(200, server.images["/rgb.png"])
                elif path == "/big.bin":
                    self._send(200, b"\0" * int(query["n"]))
                elif path == "/big-chunked.bin":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    remaining = int(query["n"])
                    try:
                        while remaining > 0:
                            chunk = b"\0" * min(remaining, 65536)
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            remaining -= len(chunk)
                        self.wfile.write(b"0\r\n\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                elif path.startswith("/redirect/"):
                    hops = int(path.rsplit("/", 1)[1])
                    target = f"/redirect/{hops - 1}" if hops > 1 else "/rgb.png"
                    self._send(302, b"", extra={"Location": target})
                elif path == "/redirect-to":
                    self._send(302, b"", extra={"Location": query["url"]})
                else:
                    self._send(404, b"not found", "text/plain")

        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
