"""Fetching images named by URL (http(s), data: and, when allowed, file:) with hard limits.

This is the one image loader: the server's :class:`ImageFetcher` and the offline API's
:func:`load_images` (``LLM.chat``) share the URL handling, base64 decoding, decoding checks and
error codes below; they differ only in their :class:`MediaFetchPolicy`.

A server that fetches whatever URL a client names can be abused: to make it download huge files,
to hang it on slow hosts, to decode decompression bombs, or to reach hosts only it can see
(server-side request forgery). Every fetch is therefore bounded:

- a deadline for the whole fetch, redirects and body included (``timeout_s``; the server reads
  ``APHRODITE_IMAGE_FETCH_TIMEOUT``, seconds, default 10);
- a cap on the bytes downloaded or decoded from base64 (``max_bytes``);
- a cap on decoded pixels, checked from the image header before any pixel is decoded
  (``max_pixels``);
- at most ``max_redirects`` redirects, each hop checked against the scheme and domain rules;
- only ``http``, ``https`` and ``data`` URLs; ``file`` URLs only under an explicitly allowed
  folder; http(s) only to ``allowed_domains`` when that list is given.

Every failure raises :class:`MediaFetchError` carrying a short machine-readable ``code`` and a
message naming the cause; the server turns it into a 400.

The offline API (:func:`offline_policy`) loads what its own user names, so it may read any local
file and reach any host, with generous size caps; the deadline is the same.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import io
import math
import os
import time
import urllib.parse
import warnings
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx
from PIL import Image, UnidentifiedImageError

DEFAULT_FETCH_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 6000 * 6000
DEFAULT_MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
# Offline caps: Pillow's own decompression-bomb limit (where Image.open raises by default) and a
# byte cap that only stops reading a wrong, huge file.
OFFLINE_MAX_PIXELS = 2 * 89_478_485
OFFLINE_MAX_BYTES = 1 << 30
_T = TypeVar("_T")


class MediaFetchError(ValueError):
    """A URL could not be turned into an image; ``code`` names the cause for API clients."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {raw!r}")
    return value


def fetch_timeout_from_env() -> float:
    """``APHRODITE_IMAGE_FETCH_TIMEOUT`` in seconds (default 10)."""
    return _env_float("APHRODITE_IMAGE_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT_S)


@dataclass(frozen=True)
class MediaFetchPolicy:
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    # None: any host; otherwise the exact host names (case-insensitive) http(s) may reach.
    allowed_domains: frozenset[str] | None = None
    # None: file:// URLs are refused; otherwise only files under this folder are readable.
    allowed_local_media_path: Path | None = None

    def __post_init__(self):
        if not (0 < self.timeout_s < math.inf):
            raise ValueError(f"timeout_s must be positive and finite, got {self.timeout_s}")
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.max_redirects < 0:
            raise ValueError("max_bytes and max_pixels must be positive, max_redirects >= 0")
        if self.allowed_domains is not None:
            object.__setattr__(
                self, "allowed_domains", frozenset(d.lower() for d in self.allowed_domains)
            )
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path).resolve()
            if not root.is_dir():
                raise ValueError(f"allowed local media path {str(root)!r} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", root)


@dataclass
class FetchTimings:
    """Seconds spent getting bytes (network, base64, file) and decoding them, per image."""

    fetch_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)


def _split_url(url: str) -> urllib.parse.SplitResult:
    try:
        return urllib.parse.urlsplit(url)
    except ValueError as e:  # an unclosed IPv6 bracket, ...
        raise MediaFetchError(
            f"invalid image URL {_short(url)!r}: {e}", "invalid_image_url"
        ) from None


def _short(url: str, limit: int = 100) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


class ImageFetcher:
    """Turns image URLs into decoded ``PIL.Image`` objects under a :class:`MediaFetchPolicy`.

    One fetcher (and its pooled HTTP client) serves all requests of a server; call
    :meth:`aclose` at shutdown.
    """

    def __init__(
        self,
        policy: MediaFetchPolicy,
        transport: httpx.AsyncBaseTransport | None = None,
        observe: Callable[[str, float], None] | None = None,
    ):
        self.policy = policy
        # Redirects are followed by hand so that every hop is checked against the rules.
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            transport=transport,
            headers={"User-Agent": "aphrodite-image-fetcher"},
            trust_env=False,
            # The policy's deadline bounds the whole fetch; httpx's own 5 s default would cut
            # a slow-but-allowed download short with a less clear error.
            timeout=httpx.Timeout(None),
        )
        # observe("fetch" | "decode", seconds): a hook for metrics.
        self._observe = observe

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch_image(self, url: str) -> Image.Image:
        """Fetches and decodes one image; raises :class:`MediaFetchError` on any failure."""
        start = time.perf_counter()
        try:
            data = await asyncio.wait_for(self._fetch_bytes(url), timeout=self.policy.timeout_s)
        except asyncio.TimeoutError:
            raise MediaFetchError(
                f"timed out after {self.policy.timeout_s:g} s fetching image {_short(url)!r}",
                "image_fetch_timeout",
            ) from None
        fetched = time.perf_counter()
        image = await asyncio.to_thread(self.decode_image, data, url)
        if self._observe is not None:
            self._observe("fetch", fetched - start)
            self._observe("decode", time.perf_counter() - fetched)
        return image

    async def fetch_images(self, urls: list[str]) -> list[Image.Image]:
        """Fetches several images concurrently; the first failure cancels the rest."""
        tasks = [asyncio.ensure_future(self.fetch_image(u)) for u in urls]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()

    # ------------------------------------------------------------------ bytes

    async def _fetch_bytes(self, url: str) -> bytes:
        scheme = _split_url(url).scheme.lower()
        if scheme == "data":
            return self._data_url_bytes(url)
        if scheme == "file":
            return await asyncio.to_thread(self._file_url_bytes, url)
        if scheme in ("http", "https"):
            return await self._http_bytes(url)
        raise MediaFetchError(
            f"unsupported image URL scheme {scheme or '(none)'!r} in {_short(url)!r}: "
            "use http, https or data:image/...;base64,...",
            "unsupported_url_scheme",
        )

    def _data_url_bytes(self, url: str) -> bytes:
        header, sep, payload = url[len("data:") :].partition(",")
        if not sep:
            raise MediaFetchError("malformed data URL: no ',' after the header", "invalid_data_url")
        parts = [p.strip().lower() for p in header.split(";")]
        media_type = parts[0]
        if not media_type.startswith("image/"):
            raise MediaFetchError(
                f"data URL media type must be image/*, got {media_type or '(none)'!r}",
                "invalid_data_url",
            )
        if "base64" not in parts[1:]:
            raise MediaFetchError(
                "data URL must be base64-encoded (';base64,')", "invalid_data_url"
            )
        # Refuse before decoding: 4 base64 characters carry 3 bytes.
        if len(payload) // 4 * 3 > self.policy.max_bytes + 3:
            raise MediaFetchError(
                f"image in data URL exceeds the {self.policy.max_bytes} byte limit",
                "image_too_large",
            )
        try:
            data = base64.b64decode(urllib.parse.unquote(payload), validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaFetchError(f"invalid base64 in data URL: {e}", "invalid_base64") from None
        if len(data) > self.policy.max_bytes:
            raise MediaFetchError(
                f"image in data URL exceeds the {self.policy.max_bytes} byte limit",
                "image_too_large",
            )
        return data

    def _file_url_bytes(self, url: str) -> bytes:
        root = self.policy.allowed_local_media_path
        if root is None:
            raise MediaFetchError(
                "file:// image URLs are disabled; start the server with "
                "--allowed-local-media-path DIR to allow files under DIR",
                "local_media_not_allowed",
            )
        parts = _split_url(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaFetchError(
                f"file URL must name a local file, got host {parts.netloc!r}",
                "local_media_not_allowed",
            )
        raw_path = urllib.parse.unquote(parts.path)
        if "\0" in raw_path:
            raise MediaFetchError("file URL path contains a NUL character", "invalid_image_url")
        # resolve() follows symlinks, so a link inside the folder cannot lead outside it.
        path = Path(raw_path).resolve()
        if not path.is_relative_to(root):
            raise MediaFetchError(
                f"file {str(path)!r} is outside the allowed local media path",
                "local_media_not_allowed",
            )
        try:
            with open(path, "rb") as f:
                data = f.read(self.policy.max_bytes + 1)
        except OSError as e:
            raise MediaFetchError(
                f"cannot read image file {str(path)!r}: {e.strerror}", "image_not_found"
            ) from None
        if len(data) > self.policy.max_bytes:
            raise MediaFetchError(
                f"image file exceeds the {self.policy.max_bytes} byte limit", "image_too_large"
            )
        return data

    def _check_http_url(self, url: str) -> None:
        parts = _split_url(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise MediaFetchError(
                f"redirect to unsupported scheme {parts.scheme!r} refused", "unsupported_url_scheme"
            )
        host = (parts.hostname or "").lower()
        if not host:
            raise MediaFetchError(f"image URL {_short(url)!r} has no host", "invalid_image_url")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError as e:
            raise MediaFetchError(
                f"invalid image URL {_short(url)!r}: {e}", "invalid_image_url"
            ) from None
        allowed = self.policy.allowed_domains
        if allowed is not None and host not in allowed:
            raise MediaFetchError(
                f"fetching images from host {host!r} is not allowed (see --allowed-media-domains)",
                "domain_not_allowed",
            )

    async def _http_bytes(self, url: str) -> bytes:
        limit = self.policy.max_bytes
        for _ in range(self.policy.max_redirects + 1):
            self._check_http_url(url)
            try:
                async with self._client.stream("GET", url) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise MediaFetchError(
                                f"redirect without a Location from {_short(url)!r}",
                                "image_fetch_failed",
                            )
                        url = str(response.url.join(location))
                        continue
                    if response.status_code != 200:
                        code = (
                            "image_not_found"
                            if response.status_code == 404
                            else "image_fetch_failed"
                        )
                        raise MediaFetchError(
                            f"fetching image {_short(url)!r} failed with HTTP status "
                            f"{response.status_code}",
                            code,
                        )
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > limit:
                        raise MediaFetchError(
                            f"image at {_short(url)!r} is {declared} bytes, over the {limit} "
                            "byte limit",
                            "image_too_large",
                        )
                    buf = bytearray()
                    async for chunk in response.aiter_bytes(_CHUNK):
                        buf += chunk
                        if len(buf) > limit:
                            raise MediaFetchError(
                                f"image at {_short(url)!r} exceeds the {limit} byte limit",
                                "image_too_large",
                            )
                    return bytes(buf)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
                # (UnsupportedProtocol is a TransportError: caught before the next clause.)
                raise MediaFetchError(
                    f"invalid image URL {_short(url)!r}: {e}", "invalid_image_url"
                ) from None
            except httpx.TransportError as e:
                # Includes a body cut short (RemoteProtocolError) and refused connections.
                raise MediaFetchError(
                    f"fetching image {_short(url)!r} failed: {type(e).__name__}: {e}",
                    "image_fetch_failed",
                ) from None
            except MediaFetchError:
                raise
            except (ValueError, OverflowError, httpx.HTTPError) as e:
                # What httpx lets through for URLs it cannot use (a redirect's bad port, ...).
                raise MediaFetchError(
                    f"fetching image {_short(url)!r} failed: {type(e).__name__}: {e}",
                    "image_fetch_failed",
                ) from None
        raise MediaFetchError(
            f"more than {self.policy.max_redirects} redirects fetching image", "too_many_redirects"
        )

    # ------------------------------------------------------------------ decoding

    def decode_image(self, data: bytes, url: str = "") -> Image.Image:
        """Decodes image bytes fully (so truncation shows now), refusing too many pixels."""
        where = f" from {_short(url)!r}" if url and not url.startswith("data:") else ""
        if not data:
            raise MediaFetchError(f"empty image{where}", "invalid_image")
        try:
            with warnings.catch_warnings():
                # Our own pixel cap replaces Pillow's DecompressionBombWarning heuristics.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > self.policy.max_pixels:
                    raise MediaFetchError(
                        f"image{where} is {width}x{height} pixels, over the "
                        f"{self.policy.max_pixels} pixel limit",
                        "image_too_many_pixels",
                    )
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)  # animated images: the first frame
                image.load()
        except MediaFetchError:
            raise
        except UnidentifiedImageError:
            raise MediaFetchError(
                f"the data{where} is not an image in a known format", "invalid_image"
            ) from None
        except Image.DecompressionBombError as e:
            raise MediaFetchError(f"image{where} refused: {e}", "image_too_many_pixels") from None
        except Exception as e:
            # Pillow reports truncated or corrupt data as OSError/SyntaxError while decoding,
            # and its rarer plugins (DDS, TIFF, ...) with whatever they raise.
            code = "truncated_image" if "truncated" in str(e) else "invalid_image"
            raise MediaFetchError(
                f"image{where} is truncated or corrupt: {type(e).__name__}: {e}", code
            ) from None
        return image


# --------------------------------------------------------------------------- offline (sync) API


def offline_policy(timeout_s: float | None = None) -> MediaFetchPolicy:
    """The policy of ``LLM.chat``: any host, any local file (the caller names its own inputs),
    the generous ``OFFLINE_*`` caps, and the deadline ``timeout_s`` (default
    ``APHRODITE_IMAGE_FETCH_TIMEOUT``)."""
    return MediaFetchPolicy(
        timeout_s=fetch_timeout_from_env() if timeout_s is None else timeout_s,
        max_bytes=OFFLINE_MAX_BYTES,
        max_pixels=OFFLINE_MAX_PIXELS,
        allowed_local_media_path=Path("/"),
    )


def _as_url(source: str) -> str:
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme == "" or len(scheme) == 1:  # a path (or a Windows drive letter)
        return Path(source).expanduser().absolute().as_uri()
    return source


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running event loop (a notebook, an async application), where
    # asyncio.run refuses: the fetch gets its own loop on a worker thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def load_images(
    sources: Sequence[Image.Image | str], timeout_s: float | None = None
) -> list[Image.Image]:
    """PIL images (returned as they are) and images named by http(s), data: or file: URLs or
    local paths, fetched concurrently under :func:`offline_policy`. Raises
    :class:`MediaFetchError` (a ValueError) when one cannot be loaded."""
    images: list[Image.Image | None] = []
    urls: list[str] = []
    for source in sources:
        if isinstance(source, Image.Image):
            images.append(source)
        elif isinstance(source, str):
            images.append(None)
            urls.append(_as_url(source))
        else:
            raise MediaFetchError(
                f"unsupported image source {type(source).__name__}: expected a PIL image, a URL "
                "or a path",
                "invalid_image_url",
            )
    if not urls:
        return images  # type: ignore[return-value]

    async def fetch_all() -> list[Image.Image]:
        fetcher = ImageFetcher(offline_policy(timeout_s))
        try:
            return await fetcher.fetch_images(urls)
        finally:
            await fetcher.aclose()

    try:
        fetched = iter(_run_sync(fetch_all()))
    except MediaFetchError as e:
        raise MediaFetchError(f"cannot load image: {e}", e.code) from None
    return [image if image is not None else next(fetched) for image in images]


def load_image(source: Image.Image | str, timeout_s: float | None = None) -> Image.Image:
    """One image; see :func:`load_images`."""
    return load_images([source], timeout_s)[0]
