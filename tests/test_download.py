"""The image downloader against a local HTTP server (127.0.0.1, random port) with good and bad answers."""

import hashlib
import io
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from http_fixtures import FixtureHandler, image_bytes, serve
from PIL import Image

from notice.data.download import (
    DEFAULT_WORKERS,
    DOWNLOAD_COLUMNS,
    MAX_BYTES,
    MAX_IMAGE_PIXELS,
    Settings,
    download_images,
    url_key,
)
from notice.data.svo_probes import CSV_COLUMNS, read_svo_probes
from notice.workflow.runtime import load_image

TIMEOUT = 0.5
SETTINGS = Settings(timeout=TIMEOUT, retries=1, backoff=0.01)


GOOD = {
    "/a.png": ("image/png", image_bytes(1, "PNG")),
    "/b.jpg": ("image/jpeg", image_bytes(2, "JPEG")),
    "/c.png": ("image/png", image_bytes(3, "PNG")),
    "/photo?id=7": ("image/jpeg", image_bytes(4, "JPEG")),  # no extension in the URL
}


class Handler(FixtureHandler):
    requests: Counter = Counter()
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's name)
        with self.lock:
            self.requests[self.path] += 1
            count = self.requests[self.path]
        if self.path in GOOD:
            return self.send(200, *GOOD[self.path])
        if self.path == "/missing.png":
            return self.send(404, "text/html", b"<html>not found</html>")
        if self.path == "/page.jpg":
            return self.send(200, "text/html", b"<html><body>consent page</body></html>")
        if self.path == "/truncated.jpg":
            data = image_bytes(5, "JPEG")
            return self.send(200, "image/jpeg", data[: len(data) // 2])
        if self.path == "/slow.png":
            time.sleep(TIMEOUT * 3)
            return self.send(200, *GOOD["/a.png"])
        if self.path == "/deleted.jpg":  # how Flickr answers a deleted photo
            self.send_response(302)
            self.send_header("Location", "/images/photo_unavailable.png")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if self.path == "/images/photo_unavailable.png":
            return self.send(200, *GOOD["/a.png"])
        if self.path == "/flaky.png":  # fails once, then works: retried
            return self.send(503, "text/plain", b"busy") if count == 1 else self.send(200, *GOOD["/c.png"])
        return self.send(500, "text/plain", b"unexpected path")


@pytest.fixture(scope="module")
def server():
    with serve(Handler) as url:
        yield url


BAD_REASONS = {
    "/missing.png": "HTTP 404",
    "/page.jpg": "not an image: PIL cannot identify the file (content-type text/html)",
    "/truncated.jpg": "truncated image",
    "/slow.png": f"timeout after {TIMEOUT:g}s",
    "/deleted.jpg": "placeholder image (redirected to {server}/images/photo_unavailable.png)",
}


def test_download_reasons_no_placeholders_and_resume(server, tmp_path):
    Handler.requests.clear()
    urls = [server + path for path in [*GOOD, *BAD_REASONS, "/flaky.png"]]
    cache = tmp_path / "cache"
    table = download_images(urls + urls[:2], cache, workers=4, settings=SETTINGS, progress=False)

    assert list(table.columns) == list(DOWNLOAD_COLUMNS)
    assert table["url"].tolist() == sorted(urls)  # one row per distinct URL
    rows = table.set_index("url")
    for path, reason in BAD_REASONS.items():
        row = rows.loc[server + path]
        assert (row.ok, row.path, row.reason) == (False, "", reason.format(server=server)), path
    assert rows.loc[server + "/missing.png", "attempts"] == 1  # a 404 is not retried
    assert rows.loc[server + "/slow.png", "attempts"] == 2  # a timeout is
    assert (rows.loc[server + "/flaky.png", ["ok", "attempts"]] == [True, 2]).all()

    # Every success is the server's file, named sha256(url) + the decoded format's extension.
    good = {server + path: body for path, (_, body) in GOOD.items()} | {server + "/flaky.png": GOOD["/c.png"][1]}
    for url, body in good.items():
        row = rows.loc[url]
        assert row.ok and row.reason == "" and not row.cached
        path = Path(row.path)
        assert path.read_bytes() == body
        assert path.name == url_key(url) + (".jpg" if body[:2] == b"\xff\xd8" else ".png")
        assert row.sha256 == hashlib.sha256(body).hexdigest()
    # No placeholder, partial or temporary file for any failure.
    assert sorted(p.name for p in cache.iterdir()) == sorted(Path(rows.loc[u, "path"]).name for u in good)

    # Resume: nothing good is requested again; cached files are reported as such.
    before = Counter(Handler.requests)
    again = download_images(urls, cache, workers=4, settings=SETTINGS, progress=False).set_index("url")
    for url in good:
        assert again.loc[url, "ok"] and again.loc[url, "cached"] and again.loc[url, "attempts"] == 0
    for path in [*GOOD, "/flaky.png"]:
        assert Handler.requests[path] == before[path], path
    assert again.loc[[server + p for p in BAD_REASONS], "reason"].tolist() == [
        reason.format(server=server) for reason in BAD_REASONS.values()
    ]

    # A damaged cache file is not trusted: it is downloaded again and replaced.
    damaged = Path(rows.loc[server + "/a.png", "path"])
    damaged.write_bytes(damaged.read_bytes()[:100])
    third = download_images([server + "/a.png"], cache, settings=SETTINGS, progress=False)
    assert third.loc[0, "ok"] and not third.loc[0, "cached"]
    assert damaged.read_bytes() == GOOD["/a.png"][1]


def test_unreachable_and_invalid_urls_are_recorded(tmp_path):
    table = download_images(
        ["ftp://example.org/x.png", "http://127.0.0.1:9/x.png"],
        tmp_path,
        settings=Settings(timeout=TIMEOUT, retries=0),
        progress=False,
    ).set_index("url")
    assert table.loc["ftp://example.org/x.png", "reason"] == "invalid URL (only http/https): 'ftp://example.org/x.png'"
    assert table.loc["http://127.0.0.1:9/x.png", "reason"].startswith("connection error:")
    assert not table["ok"].any()
    assert list(tmp_path.iterdir()) == []


def test_svo_samples_of_failed_images_are_excluded_with_the_download_reason(server, tmp_path):
    rows = [
        [
            "A child crossing the street.",
            "child,cross,street",
            "lady,cross,street",
            "True",
            "False",
            "False",
            server + "/a.png",
            server + "/b.jpg",
            "101",
            "102",
        ],
        [
            "A dog lying on grass.",
            "dog,lie,grass",
            "goat,lie,grass",
            "True",
            "False",
            "False",
            server + "/c.png",
            server + "/missing.png",
            "103",
            "104",
        ],
        [
            "A man riding a horse.",
            "man,ride,horse",
            "man,feed,horse",
            "False",
            "True",
            "False",
            server + "/slow.png",
            server + "/b.jpg",
            "105",
            "102",
        ],
    ]
    csv_path = tmp_path / "svo_probes.csv"
    pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(csv_path, index=False)
    urls = sorted({row[6] for row in rows} | {row[7] for row in rows})
    downloads = download_images(urls, tmp_path / "cache", settings=SETTINGS, progress=False)
    samples, pool, exclusions = read_svo_probes(csv_path, downloads, dataset="svo")

    assert samples["sample_id"].tolist() == ["svo_r000000_pos", "svo_r000000_neg"]
    assert len(samples) + len(exclusions) == 2 * len(rows)
    reasons = dict(zip(exclusions["sample_id"], exclusions["reason"]))
    # Reasons name the CSV file line (line 1 is the header).
    missing = f"svo_probes.csv line 3: negative image failed to download: HTTP 404 ({server}/missing.png)"
    slow = f"svo_probes.csv line 4: positive image failed to download: timeout after {TIMEOUT:g}s ({server}/slow.png)"
    assert reasons == {
        "svo_r000001_pos": missing,
        "svo_r000001_neg": missing,
        "svo_r000002_pos": slow,
        "svo_r000002_neg": slow,
    }
    assert set(pool["pool_key"]) == {"svo_r000000"}


SMALL = GOOD["/a.png"][1]
SENT_AT_MOST = 16 * 1024 * 1024  # what an endless answer sends before giving up (the client should stop long before)


class BodyHandler(FixtureHandler):
    """SMALL framed three ways (/length/, /close/: no length, ends at close; /chunked/), the same framings of
    an endless body, and a Content-Length of 1 TB with no body at all."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        framing, _, what = self.path.strip("/").partition("/")
        body = SMALL if what == "small.png" else None
        if framing == "length" and what == "terabyte.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            return self.end_headers()  # and close: a client that reads the body gets a truncated download
        if framing == "length":
            return self.send(200, "image/png", body)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self.stream(body, framing == "chunked")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what the size limit is for

    def stream(self, body: bytes | None, chunked: bool) -> None:
        blocks = [body] if body is not None else (b"\0" * 65536 for _ in range(SENT_AT_MOST // 65536))
        for block in blocks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def body_server():
    with serve(BodyHandler) as url:
        yield url


FRAMINGS = ("length", "close", "chunked")


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_body_of_max_bytes_is_accepted_one_byte_more_is_refused(body_server, tmp_path, framing):
    url = f"{body_server}/{framing}/small.png"
    exact = Settings(timeout=5, retries=1, max_bytes=len(SMALL))
    row = download_images([url], tmp_path / "exact", settings=exact, progress=False).iloc[0]
    assert row.ok and Path(row.path).read_bytes() == SMALL

    over = Settings(timeout=5, retries=1, max_bytes=len(SMALL) - 1)
    row = download_images([url], tmp_path / "over", settings=over, progress=False).iloc[0]
    reason = f"body larger than {len(SMALL) - 1} bytes (download.max_bytes)"
    assert (row.ok, row.reason, row.attempts) == (False, reason, 1)
    assert list((tmp_path / "over").iterdir()) == []


def test_huge_and_endless_bodies_are_refused_and_the_rest_continues(body_server, tmp_path):
    huge = [f"{body_server}/length/terabyte.png", f"{body_server}/close/endless", f"{body_server}/chunked/endless"]
    good = f"{body_server}/chunked/small.png"
    settings = Settings(timeout=5, retries=2, backoff=0.01, max_bytes=100_000)
    rows = download_images([*huge, good], tmp_path, workers=2, settings=settings, progress=False).set_index("url")
    # The declared terabyte is refused before reading (reading it would be "truncated download: ...");
    # endless bodies stop at the limit (reading on would take the whole 5 s timeout, or all 16 MiB).
    for url in huge:
        assert (rows.loc[url, "ok"], rows.loc[url, "reason"], rows.loc[url, "attempts"]) == (
            False,
            "body larger than 100000 bytes (download.max_bytes)",
            1,
        ), url
    assert rows.loc[good, "ok"] and Path(rows.loc[good, "path"]).read_bytes() == SMALL


def test_schema_download_section_matches_the_downloader():
    """Every description is one string (an unquoted comma in a flow mapping splits it into junk keys that
    show up in validation errors), and the schema's defaults are the downloader's."""
    schema = yaml.safe_load((Path(__file__).parents[1] / "config/schemas/config.schema.yaml").read_text())
    download = schema["definitions"]["download"]["properties"]
    for key, spec in download.items():
        assert set(spec) <= {"type", "minimum", "maximum", "exclusiveMinimum", "default", "description"}, key
        assert isinstance(spec["description"], str), key
    defaults = Settings()
    assert {key: spec["default"] for key, spec in download.items()} == {
        "workers": DEFAULT_WORKERS,
        "timeout_s": defaults.timeout,
        "retries": defaults.retries,
        "backoff_s": defaults.backoff,
        "max_bytes": defaults.max_bytes,
        "max_image_pixels": defaults.max_image_pixels,
    }
    assert (defaults.max_bytes, defaults.max_image_pixels) == (MAX_BYTES, MAX_IMAGE_PIXELS) == (32 * 2**20, 50_000_000)
    assert (
        download["max_image_pixels"]["maximum"] == MAX_IMAGE_PIXELS
    )  # what notice.workflow.runtime.load_image accepts


def encoded(mode: str, fmt: str) -> bytes:
    """A 32x24 image in colour `mode` encoded as `fmt` (how published datasets' hosts serve them)."""
    array = np.random.default_rng(9).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


PUBLISHED_BODIES = {
    "/png_behind.jpg": ("image/jpeg", encoded("RGB", "PNG"), ".png"),  # the URL's extension lies
    "/cmyk.jpg": ("image/jpeg", encoded("CMYK", "JPEG"), ".jpg"),
    "/grey.jpg": ("image/jpeg", encoded("L", "JPEG"), ".jpg"),
    "/anim.gif": ("image/gif", encoded("P", "GIF"), ".gif"),
    "/photo.webp": ("image/webp", encoded("RGB", "WEBP"), ".webp"),
}


class PublishedHandler(FixtureHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        content_type, body, _ = PUBLISHED_BODIES[self.path]
        return self.send(200, content_type, body)


def test_published_formats_are_kept_under_their_real_format_and_load_as_rgb(tmp_path):
    with serve(PublishedHandler) as url:
        table = download_images(
            [url + path for path in PUBLISHED_BODIES], tmp_path, workers=2, settings=SETTINGS, progress=False
        )
    assert table["ok"].all(), table[["url", "reason"]].to_string()
    saved_paths = dict(zip(table["url"], table["path"]))
    for path, (_, body, extension) in PUBLISHED_BODIES.items():
        saved = saved_paths[url + path]
        assert Path(saved).suffix == extension, path
        assert Path(saved).read_bytes() == body  # stored as served, converted only when loaded
        image = load_image(saved)
        assert image.mode == "RGB" and image.size == (32, 24), path
