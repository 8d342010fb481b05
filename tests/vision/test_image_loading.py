"""Loading prompt images (lmport.server.images): data URIs, the limits, and URL fetching only
when allowed; fetching is tested against a loopback server started here (no other network)."""

from __future__ import annotations

import asyncio
import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmport.server.errors import ValidationFailed
from lmport.server.images import MARKDOWN_IMAGE, ImagePolicy, image_digest, load_image
from lmport.testing.tiny_vision import png_bytes, tiny_image

PNG = png_bytes(tiny_image(3, 20, 10))
ALLOW = ImagePolicy(allow_remote=True, max_bytes=len(PNG) + 10, fetch_timeout=5.0)


def load(url: str, policy: ImagePolicy = ImagePolicy()):
    return asyncio.run(load_image(url, policy))


def test_markdown_pattern_is_tgis():
    text = "a ![](data:image/png;base64,AAA=) b ![](http://x/y.png) ![alt](http://not/this.png)"
    assert MARKDOWN_IMAGE.findall(text) == ["data:image/png;base64,AAA=", "http://x/y.png"]


def test_data_uri_decodes_to_rgb_with_a_pixel_digest():
    image = tiny_image(3, 20, 10)
    loaded = load("data:image/png;base64," + base64.b64encode(PNG).decode())
    assert loaded.image.mode == "RGB" and loaded.image.size == (20, 10)
    assert loaded.digest == image_digest(image.convert("RGB"))
    assert loaded.digest != image_digest(tiny_image(4, 20, 10))


def test_limits():
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with pytest.raises(ValidationFailed, match="limit of 100 bytes"):
        load(uri, ImagePolicy(max_bytes=100))
    with pytest.raises(ValidationFailed, match="more than the limit of 100 pixels"):
        load(uri, ImagePolicy(max_pixels=100))
    truncated = "data:image/png;base64," + base64.b64encode(PNG[: len(PNG) // 2]).decode()
    with pytest.raises(ValidationFailed, match="could not be decoded"):
        load(truncated)


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def loopback():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, PNG),
        "/moved": (302, {"Location": "/cat.png"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big.png": (200, {}, PNG + b"\0" * 100),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base
    server.shutdown()
    server.server_close()


def test_urls_are_refused_unless_allowed(loopback):
    with pytest.raises(ValidationFailed, match="--allow-remote-images"):
        load(f"{loopback}/cat.png")


def test_fetch_follows_http_redirects_only(loopback):
    assert load(f"{loopback}/cat.png", ALLOW).image.size == (20, 10)
    assert load(f"{loopback}/moved", ALLOW).image.size == (20, 10)
    with pytest.raises(ValidationFailed, match="not http"):
        load(f"{loopback}/to-file", ALLOW)
    with pytest.raises(ValidationFailed, match="redirected more than"):
        load(f"{loopback}/loop", ALLOW)
    with pytest.raises(ValidationFailed, match="HTTP 404"):
        load(f"{loopback}/missing.png", ALLOW)
    with pytest.raises(ValidationFailed, match="limit of"):
        load(f"{loopback}/big.png", ALLOW)
    with pytest.raises(ValidationFailed, match="not http"):
        load("ftp://127.0.0.1/cat.png", ALLOW)
