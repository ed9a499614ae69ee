"""Image fetching with limits (aphrodite.multimodal.fetch), against a local HTTP server."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import numpy as np
import pytest
from _image_server import ImageServer, encode
from PIL import Image

from aphrodite.multimodal.fetch import (
    ImageFetcher,
    MediaFetchError,
    MediaFetchPolicy,
    fetch_timeout_from_env,
)


@pytest.fixture(scope="module")
def server():
    with ImageServer() as s:
        yield s


def fetch(url: str, **policy) -> Image.Image:
    async def go():
        fetcher = ImageFetcher(MediaFetchPolicy(**policy))
        try:
            return await fetcher.fetch_image(url)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def fetch_error(url: str, **policy) -> MediaFetchError:
    with pytest.raises(MediaFetchError) as info:
        fetch(url, **policy)
    return info.value


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize(
    "path, mode, size",
    [("/rgb.jpg", "RGB", (64, 48)), ("/rgb.png", "RGB", (64, 48)), ("/gray.png", "L", (40, 40)),
     ("/rgba.png", "RGBA", (24, 32))],
)
def test_http_formats_decode(server, path, mode, size):
    image = fetch(server.url(path))
    assert image.mode == mode and image.size == size
    reference = Image.open(__import__("io").BytesIO(server.images[path]))
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_data_url_decodes_same_pixels(server):
    png = server.images["/rgba.png"]
    image = fetch(data_url(png))
    assert image.size == (24, 32)
    assert np.array_equal(np.asarray(image), np.asarray(fetch(server.url("/rgba.png"))))


@pytest.mark.parametrize(
    "url, code",
    [
        ("data:image/png;base64,!!!notbase64!!!", "invalid_base64"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_data_url"),
        ("data:image/png,rawbytes", "invalid_data_url"),
        ("data:image/png;base64", "invalid_data_url"),
        (data_url(b"hello, not an image"), "invalid_image"),
        ("ftp://127.0.0.1/x.png", "unsupported_url_scheme"),
        ("/relative/path.png", "unsupported_url_scheme"),
        ("file:///etc/hostname", "local_media_not_allowed"),
    ],
)
def test_bad_urls(url, code):
    assert fetch_error(url).code == code


@pytest.mark.parametrize(
    "path, code, words",
    [
        ("/missing.png", "image_not_found", "404"),
        ("/notimage.png", "invalid_image", "not an image"),
        ("/truncated.jpg", "truncated_image", "truncated"),
        ("/big.bin?n=300000", "image_too_large", "byte limit"),
        ("/big-chunked.bin?n=300000", "image_too_large", "byte limit"),
        ("/bomb.png", "image_too_many_pixels", "6000x6000"),
    ],
)
def test_http_failures(server, path, code, words):
    err = fetch_error(server.url(path), max_bytes=200_000, max_pixels=4096 * 4096)
    assert err.code == code
    assert words in str(err)


def test_data_url_size_cap(server):
    err = fetch_error(data_url(server.images["/rgb.png"]), max_bytes=1000)
    assert err.code == "image_too_large"


def test_timeout_honoured(server):
    start = time.monotonic()
    err = fetch_error(server.url("/slow.png?s=20"), timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert err.code == "image_fetch_timeout" and "1 s" in str(err)
    assert 1.0 <= elapsed < 2.0


def test_timeout_env(monkeypatch):
    monkeypatch.delenv("APHRODITE_IMAGE_FETCH_TIMEOUT", raising=False)
    assert fetch_timeout_from_env() == 10.0
    monkeypatch.setenv("APHRODITE_IMAGE_FETCH_TIMEOUT", "2.5")
    assert fetch_timeout_from_env() == 2.5
    for bad in ("abc", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("APHRODITE_IMAGE_FETCH_TIMEOUT", bad)
        with pytest.raises(ValueError, match="APHRODITE_IMAGE_FETCH_TIMEOUT"):
            fetch_timeout_from_env()


def test_redirects(server):
    assert fetch(server.url("/redirect/3")).size == (64, 48)
    err = fetch_error(server.url("/redirect/3"), max_redirects=2)
    assert err.code == "too_many_redirects"
    # A redirect may not switch to another scheme (file:// would read local files).
    err = fetch_error(server.url("/redirect-to?url=file:///etc/passwd"))
    assert err.code == "unsupported_url_scheme"


def test_allowed_domains(server):
    allowed = frozenset({"127.0.0.1"})
    assert fetch(server.url("/rgb.png"), allowed_domains=allowed).size == (64, 48)
    # Refused before any connection is made.
    err = fetch_error("http://example.com/cat.png", allowed_domains=allowed)
    assert err.code == "domain_not_allowed" and "example.com" in str(err)
    # Every redirect hop is checked, not only the first URL.
    hop = server.url(f"/redirect-to?url=http://localhost:{server.port}/rgb.png")
    err = fetch_error(hop, allowed_domains=allowed)
    assert err.code == "domain_not_allowed" and "localhost" in str(err)


def test_local_files(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    image = Image.fromarray(np.full((5, 7, 3), 200, dtype=np.uint8))
    (media / "ok.png").write_bytes(encode(image, "PNG"))
    (tmp_path / "secret.png").write_bytes(encode(image, "PNG"))
    os.symlink(tmp_path / "secret.png", media / "link.png")
    assert fetch(f"file://{media}/ok.png", allowed_local_media_path=media).size == (7, 5)
    for url in (f"file://{tmp_path}/secret.png", f"file://{media}/../secret.png",
                f"file://{media}/link.png"):
        err = fetch_error(url, allowed_local_media_path=media)
        assert err.code == "local_media_not_allowed"
    assert fetch_error(f"file://{media}/nope.png", allowed_local_media_path=media).code == (
        "image_not_found")
    with pytest.raises(ValueError, match="not a directory"):
        MediaFetchPolicy(allowed_local_media_path=media / "ok.png")


def test_fetch_many_keeps_order_and_fails_fast(server):
    async def go(urls, timeout_s=10.0):
        fetcher = ImageFetcher(MediaFetchPolicy(timeout_s=timeout_s))
        try:
            return await fetcher.fetch_images(urls)
        finally:
            await fetcher.aclose()

    images = asyncio.run(go([server.url("/gray.png"), server.url("/rgb.jpg"),
                             data_url(server.images["/rgba.png"])]))
    assert [im.size for im in images] == [(40, 40), (64, 48), (24, 32)]
    start = time.monotonic()
    with pytest.raises(MediaFetchError) as info:
        asyncio.run(go([server.url("/slow.png?s=20"), server.url("/missing.png")]))
    assert info.value.code == "image_not_found"
    assert time.monotonic() - start < 5.0  # the 404 did not wait for the slow image
