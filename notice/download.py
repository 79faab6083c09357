"""Download images into a cache directory: parallel, resumable, verified, never a placeholder.

Each URL is cached as ``<sha256(url)><ext>`` where ``ext`` comes from the decoded image format, so a
URL maps to one file whatever its path looks like. A download is accepted only when the bytes
decode completely as an image with PIL (``Image.open(...).load()``: truncated files fail); it is
then written atomically (temporary file, then rename), so the cache never holds a partial or invalid
file. A URL whose file is already cached and still decodes is not requested again (resume).

Every URL gets one row in the downloads table (DOWNLOAD_COLUMNS): ``ok`` with path and sha256 of
the file, or the reason it failed ("HTTP 404", "timeout after 30s", "not an image: ...",
"truncated image", "placeholder image (redirected to ...)", ...). Failed images are left out, never
replaced: later stages exclude the samples that need them, with this reason. A redirect to a host's
"photo unavailable" picture is such a failure, although that picture is a valid image.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd
from PIL import Image, ImageFile
from tqdm import tqdm

from notice.tables import make_table

DOWNLOAD_COLUMNS: tuple[str, ...] = ("url", "ok", "path", "sha256", "reason", "attempts", "cached")
DOWNLOAD_DTYPES = {"ok": "bool", "attempts": "int64", "cached": "bool"}

# File extension of each PIL format we accept; other decodable formats use the lower-case format name.
EXTENSIONS: dict[str, str] = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
                              "TIFF": ".tif", "MPO": ".jpg"}
# Some image hosts refuse Python's default agent string.
USER_AGENT = "Mozilla/5.0 (compatible; notice-workflow/0.1; research image download)"
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
# Hosts answer a deleted image by redirecting to a valid "image unavailable" picture (Flickr, Imgur):
# a real image file, but not the one the dataset means.
PLACEHOLDER_REDIRECTS: tuple[str, ...] = ("photo_unavailable", "/removed.png")
CHUNK = 1 << 16


class DownloadError(Exception):
    """One failed attempt; `retryable` says whether another attempt may succeed."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason, self.retryable = reason, retryable


@dataclass(frozen=True)
class Settings:
    timeout: float = 30.0        # seconds per attempt (connect, each read, and the whole body)
    retries: int = 2             # extra attempts after a retryable failure
    backoff: float = 1.0         # sleep backoff * 2**i seconds before retry i
    user_agent: str = USER_AGENT


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def image_extension(data: bytes) -> str:
    """The file extension of `data` if it decodes completely as an image; raise DownloadError otherwise."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Something in this process told PIL to accept truncated files: verification would lie.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated downloads cannot be detected")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image_format = image.format or ""
    except Image.UnidentifiedImageError:
        raise DownloadError("not an image: PIL cannot identify the file", retryable=False) from None
    except Image.DecompressionBombError as error:
        raise DownloadError(f"image too large: {error}", retryable=False) from None
    except (OSError, SyntaxError, ValueError) as error:
        if "truncated" in str(error).lower():
            raise DownloadError("truncated image", retryable=True) from None
        raise DownloadError(f"not an image: {error}", retryable=False) from None
    return EXTENSIONS.get(image_format, f".{image_format.lower() or 'img'}")


def cached_file(cache_dir: Path, url: str) -> Path | None:
    """The cached file of `url` if there is one that still decodes as an image.

    (Temporary files start with "." and never match.)
    """
    for path in sorted(cache_dir.glob(f"{url_key(url)}.*")):
        try:
            image_extension(path.read_bytes())
        except DownloadError:
            continue  # a damaged cache file is downloaded again (and overwritten)
        return path
    return None


def fetch(url: str, settings: Settings) -> tuple[bytes, str]:
    """(body, content type) of one GET, or DownloadError. The whole body must arrive within `timeout`."""
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
            chunks = []
            while block := response.read(CHUNK):
                chunks.append(block)
                if time.monotonic() > deadline:
                    raise DownloadError(timeout_reason, retryable=True)
            return b"".join(chunks), response.headers.get_content_type()
    except urllib.error.HTTPError as error:
        raise DownloadError(f"HTTP {error.code}", retryable=error.code in RETRYABLE_HTTP) from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, (TimeoutError, socket.timeout)):
            raise DownloadError(timeout_reason, retryable=True) from None
        raise DownloadError(f"connection error: {error.reason}", retryable=True) from None
    except (TimeoutError, socket.timeout):
        raise DownloadError(timeout_reason, retryable=True) from None
    except http.client.IncompleteRead as error:
        raise DownloadError(
            f"truncated download: got {len(error.partial)} bytes, {error.expected} more expected", retryable=True
        ) from None
    except (http.client.HTTPException, ConnectionError) as error:
        raise DownloadError(f"connection error: {type(error).__name__}: {error}", retryable=True) from None
    except ValueError as error:  # malformed URL
        raise DownloadError(f"invalid URL: {error}", retryable=False) from None


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
    found = cached_file(cache_dir, url)
    if found is not None:
        return _row(url, True, found, sha256_file(found), "", 0, True)
    reason, attempt = "", 0
    for attempt in range(1, settings.retries + 2):
        if attempt > 1:
            time.sleep(settings.backoff * 2 ** (attempt - 2))
        try:
            data, content_type = fetch(url, settings)
            extension = _extension_of_download(data, content_type)
        except DownloadError as error:
            reason = error.reason
            if error.retryable:
                continue
            break
        path = cache_dir / f"{url_key(url)}{extension}"
        write_atomically(data, path)
        return _row(url, True, path, hashlib.sha256(data).hexdigest(), "", attempt, False)
    return _row(url, False, None, "", reason, attempt, False)


def _extension_of_download(data: bytes, content_type: str) -> str:
    """image_extension, saying what the server sent when it was not an image (often an HTML page)."""
    try:
        return image_extension(data)
    except DownloadError as error:
        if error.reason.startswith("not an image"):
            raise DownloadError(f"{error.reason} (content-type {content_type})", error.retryable) from None
        raise


def _row(url: str, ok: bool, path: Path | None, sha: str, reason: str, attempts: int, cached: bool) -> dict:
    return {"url": url, "ok": ok, "path": str(path) if path else "", "sha256": sha, "reason": reason,
            "attempts": attempts, "cached": cached}


def download_images(
    urls: Iterable[str],
    cache_dir: str | Path,
    workers: int = 8,
    settings: Settings = Settings(),
    progress: bool = True,
) -> pd.DataFrame:
    """Download every distinct URL into `cache_dir` with `workers` threads; one row per URL, sorted by URL."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    unique = sorted(set(urls))
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(unique), desc="images", unit="url", file=sys.stderr, disable=not progress) as bar:
        futures = [pool.submit(download_one, url, cache, settings) for url in unique]
        for future in as_completed(futures):
            rows.append(future.result())
            bar.update(1)
    table = make_table(rows, DOWNLOAD_COLUMNS, DOWNLOAD_DTYPES)
    return table.sort_values("url", kind="stable").reset_index(drop=True)
