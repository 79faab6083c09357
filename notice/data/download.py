"""Download images into a cache directory: parallel, resumable, verified, never a placeholder.

Each URL is cached as ``<sha256(url)><ext>`` where ``ext`` comes from the decoded image format, so a
URL maps to one file whatever its path looks like. A download is accepted only when the bytes
decode completely as an image with PIL (``Image.open(...).load()``: truncated files fail); it is
then written atomically (temporary file, then rename), so the cache never holds a partial or invalid
file. A URL whose file is already cached and still decodes is not requested again (resume).

Two limits keep one bad URL among 100k from exhausting memory: a body longer than
``Settings.max_bytes`` is refused (from its Content-Length, else as soon as the bytes read pass it),
and an image whose header gives more than ``Settings.max_image_pixels`` pixels is refused before its
pixels are decoded. Neither is retried: the same URL would answer the same.

Every URL gets one row in the downloads table (DOWNLOAD_COLUMNS): ``ok`` with path and sha256 of
the file, or the reason it failed ("HTTP 404", "timeout after 30s", "not an image: ...",
"truncated image", "placeholder image (redirected to ...)", "body larger than 33554432 bytes
(download.max_bytes)", "image larger than 50000000 pixels (download.max_image_pixels)", ...).
Failed images are left out, never replaced: later stages exclude the samples that need them, with
this reason. A redirect to a host's "photo unavailable" picture is such a failure, although that
picture is a valid image.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pandas as pd
from PIL import Image, ImageFile
from tqdm import tqdm

from notice.files.tables import make_table

DOWNLOAD_COLUMNS: tuple[str, ...] = ("url", "ok", "path", "sha256", "reason", "attempts", "cached")
DOWNLOAD_DTYPES = {"ok": "bool", "attempts": "int64", "cached": "bool"}

# File extension of each PIL format we accept; other decodable formats use the lower-case format name.
EXTENSIONS: dict[str, str] = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "MPO": ".jpg",
}
# Some image hosts refuse Python's default agent string.
USER_AGENT = "Mozilla/5.0 (compatible; notice-workflow/0.1; research image download)"
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
# Hosts answer a deleted image by redirecting to a valid "image unavailable" picture (Flickr, Imgur):
# a real image file, but not the one the dataset means.
PLACEHOLDER_REDIRECTS: tuple[str, ...] = ("photo_unavailable", "/removed.png")
CHUNK = 1 << 16
# A web photo is a few MB; 32 MiB leaves room for large originals, and 8 workers stay within a few hundred MB.
MAX_BYTES = 32 * 1024 * 1024
# 50 MP holds any camera photo (a 48 MP phone sensor is 8000x6000) and is 150 MB once decoded as RGB.
# It stays below PIL's own Image.MAX_IMAGE_PIXELS (89.5 MP, where PIL only warns; it raises
# DecompressionBombError above twice that), so PIL never warns about an image we accept.
MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_WORKERS = 8  # parallel downloads (config download.workers)


class DownloadError(Exception):
    """One failed attempt; `retryable` says whether another attempt may succeed."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason, self.retryable = reason, retryable


class ImageTooLarge(ValueError):
    """An image whose header gives more pixels than allowed (found before its pixels are decoded)."""


@dataclass(frozen=True)
class Settings:
    timeout: float = 30.0  # seconds per attempt (connect, each read, and the whole body)
    retries: int = 2  # extra attempts after a retryable failure
    backoff: float = 1.0  # sleep backoff * 2**i seconds before retry i
    user_agent: str = USER_AGENT
    max_bytes: int = MAX_BYTES  # a longer body is refused (config download.max_bytes)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # a larger image is refused (config download.max_image_pixels)


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def open_image(source: str | os.PathLike | IO[bytes], max_pixels: int) -> Iterator[Image.Image]:
    """The lazily opened image (header read, pixels not decoded), or ImageTooLarge if it has more than
    `max_pixels` pixels: a small file can declare a huge image, and decoding it would fill memory.

    PIL's own guard is too lax and not a reason we can record: it only warns up to twice
    Image.MAX_IMAGE_PIXELS (89.5 MP), and above that raises DecompressionBombError while opening,
    which is reported here as ImageTooLarge too (true while `max_pixels` is below PIL's limit, as
    MAX_IMAGE_PIXELS and the config schema's maximum are). Between 89.5 and 179 MP PIL's warning is
    still logged before ImageTooLarge: silencing it would change process-wide warning filters from
    the downloader's threads.
    """
    too_large = ImageTooLarge(f"image larger than {max_pixels} pixels")
    try:
        opened = Image.open(source)
    except Image.DecompressionBombError:
        raise too_large from None
    with opened as image:
        if image.width * image.height > max_pixels:
            raise too_large
        yield image


def image_extension(data: bytes, max_pixels: int) -> str:
    """The file extension of `data` if it decodes completely as an image of at most `max_pixels`
    pixels; raise DownloadError otherwise."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Something in this process told PIL to accept truncated files: verification would lie.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated downloads cannot be detected")
    try:
        with open_image(io.BytesIO(data), max_pixels) as image:
            image.load()
            image_format = image.format or ""
    except Image.UnidentifiedImageError:
        raise DownloadError("not an image: PIL cannot identify the file", retryable=False) from None
    except ImageTooLarge as error:
        raise DownloadError(f"{error} (download.max_image_pixels)", retryable=False) from None
    except Image.DecompressionBombError as error:
        raise DownloadError(f"image too large: {error}", retryable=False) from None
    except (OSError, SyntaxError, ValueError) as error:
        if "truncated" in str(error).lower():
            raise DownloadError("truncated image", retryable=True) from None
        raise DownloadError(f"not an image: {error}", retryable=False) from None
    return EXTENSIONS.get(image_format, f".{image_format.lower() or 'img'}")


def cached_file(cache_dir: Path, url: str, max_pixels: int) -> Path | None:
    """The cached file of `url` if there is one that still decodes as an image within `max_pixels`.

    (Temporary files start with "." and never match.)
    """
    for path in sorted(cache_dir.glob(f"{url_key(url)}.*")):
        try:
            image_extension(path.read_bytes(), max_pixels)
        except DownloadError:
            continue  # a damaged cache file is downloaded again (and overwritten)
        return path
    return None


def fetch(url: str, settings: Settings) -> tuple[bytes, str]:
    """(body, content type) of one GET, or DownloadError. The whole body must arrive within `timeout`
    and be at most `max_bytes` long."""
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"invalid URL (only http/https): {url!r}", retryable=False)
    request = urllib.request.Request(url, headers={"User-Agent": settings.user_agent})
    timeout_reason = f"timeout after {settings.timeout:g}s"
    deadline = time.monotonic() + settings.timeout
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout) as response:
            final = response.geturl()
            if final != url and any(marker in final.lower() for marker in PLACEHOLDER_REDIRECTS):
                raise DownloadError(f"placeholder image (redirected to {final})", retryable=False)
            return read_body(
                response, settings.max_bytes, deadline, timeout_reason
            ), response.headers.get_content_type()
    except urllib.error.HTTPError as error:
        raise DownloadError(f"HTTP {error.code}", retryable=error.code in RETRYABLE_HTTP) from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, (TimeoutError, socket.timeout)):
            raise DownloadError(timeout_reason, retryable=True) from None
        raise DownloadError(f"connection error: {error.reason}", retryable=True) from None
    except TimeoutError:
        raise DownloadError(timeout_reason, retryable=True) from None
    except http.client.IncompleteRead as error:
        raise DownloadError(
            f"truncated download: got {len(error.partial)} bytes, {error.expected} more expected", retryable=True
        ) from None
    except (http.client.HTTPException, ConnectionError) as error:
        raise DownloadError(f"connection error: {type(error).__name__}: {error}", retryable=True) from None
    except ValueError as error:  # malformed URL
        raise DownloadError(f"invalid URL: {error}", retryable=False) from None


def read_body(response: http.client.HTTPResponse, max_bytes: int, deadline: float, timeout_reason: str) -> bytes:
    """The body read in chunks, refused (not retried) once it is known to be longer than `max_bytes`.

    The time limit alone would let one endless or huge answer fill memory (timeout x bandwidth bytes):
    a Content-Length above the limit is refused before reading, and a body without one (chunked, or
    ending at close) as soon as the bytes read pass the limit.
    """
    too_large = DownloadError(f"body larger than {max_bytes} bytes (download.max_bytes)", retryable=False)
    if response.length is not None and response.length > max_bytes:
        raise too_large
    chunks, size = [], 0
    while block := response.read(CHUNK):
        chunks.append(block)
        size += len(block)
        if size > max_bytes:
            raise too_large
        if time.monotonic() > deadline:
            raise DownloadError(timeout_reason, retryable=True)
    return b"".join(chunks)


def write_atomically(data: bytes, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: no reader sees a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def download_one(url: str, cache_dir: Path, settings: Settings) -> dict:
    """One row of the downloads table for `url` (from the cache when it is there)."""
    found = cached_file(cache_dir, url, settings.max_image_pixels)
    if found is not None:
        return _row(url, True, found, sha256_file(found), "", 0, True)
    reason, attempt = "", 0
    for attempt in range(1, settings.retries + 2):
        if attempt > 1:
            time.sleep(settings.backoff * 2 ** (attempt - 2))
        try:
            data, content_type = fetch(url, settings)
            extension = _extension_of_download(data, content_type, settings.max_image_pixels)
        except DownloadError as error:
            reason = error.reason
            if error.retryable:
                continue
            break
        path = cache_dir / f"{url_key(url)}{extension}"
        write_atomically(data, path)
        return _row(url, True, path, hashlib.sha256(data).hexdigest(), "", attempt, False)
    return _row(url, False, None, "", reason, attempt, False)


def _extension_of_download(data: bytes, content_type: str, max_pixels: int) -> str:
    """image_extension, saying what the server sent when it was not an image (often an HTML page)."""
    try:
        return image_extension(data, max_pixels)
    except DownloadError as error:
        if error.reason.startswith("not an image"):
            raise DownloadError(f"{error.reason} (content-type {content_type})", error.retryable) from None
        raise


def _row(url: str, ok: bool, path: Path | None, sha: str, reason: str, attempts: int, cached: bool) -> dict:
    return {
        "url": url,
        "ok": ok,
        "path": str(path) if path else "",
        "sha256": sha,
        "reason": reason,
        "attempts": attempts,
        "cached": cached,
    }


def download_images(
    urls: Iterable[str],
    cache_dir: str | Path,
    workers: int = DEFAULT_WORKERS,
    settings: Settings = Settings(),  # noqa: B008 (frozen: one shared default is safe)
    progress: bool = True,
) -> pd.DataFrame:
    """Download every distinct URL into `cache_dir` with `workers` threads; one row per URL, sorted by URL."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    unique = sorted(set(urls))
    rows = []
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=len(unique), desc="images", unit="url", file=sys.stderr, disable=not progress) as bar,
    ):
        futures = [pool.submit(download_one, url, cache, settings) for url in unique]
        for future in as_completed(futures):
            rows.append(future.result())
            bar.update(1)
    table = make_table(rows, DOWNLOAD_COLUMNS, DOWNLOAD_DTYPES)
    return table.sort_values("url", kind="stable").reset_index(drop=True)
