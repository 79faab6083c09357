"""The pixel limit: images whose header declares too many pixels are refused before decoding, by the
downloader (a downloads-table reason) and by notice.workflow.runtime.load_image (a ValueError naming the file)."""

import io
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from http_fixtures import FixtureHandler, image_bytes, serve
from PIL import Image

from notice.data.download import MAX_IMAGE_PIXELS, Settings, download_images
from notice.workflow.runtime import load_image

SMALL = image_bytes(1, "PNG")  # 32x24 = 768 pixels


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height greyscale pixels but holds only a few bytes of them: decoding
    it would fail as truncated, so a refusal for its size shows the size was checked first."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def blank_png(width: int, height: int) -> bytes:
    """A complete, valid single-colour 1-bit PNG: a few kB for millions of pixels."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {
    "/small.png": SMALL,
    "/64mp.png": png_header(8000, 8000),  # over our 50 MP, under PIL's 89.5 MP: PIL says nothing
    "/400mp.png": png_header(20000, 20000),  # over twice PIL's limit: PIL's DecompressionBombError on open
    "/valid-64mp.png": blank_png(8000, 8000),  # would decode fine (64 MB) without the limit
}


class Handler(FixtureHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        return self.send(200, "image/png", IMAGES[self.path])


@pytest.fixture(scope="module")
def server():
    with serve(Handler) as url:
        yield url


def test_downloader_refuses_images_over_the_pixel_limit_without_retrying(server, tmp_path):
    assert len(IMAGES["/valid-64mp.png"]) < 100_000  # small files: only the pixel limit can stop them
    urls = [server + path for path in IMAGES]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        rows = download_images(urls, tmp_path, settings=Settings(timeout=5, retries=2), progress=False)
    rows = rows.set_index("url")
    for path in ["/64mp.png", "/400mp.png", "/valid-64mp.png"]:
        assert (
            rows.loc[server + path, "ok"],
            rows.loc[server + path, "reason"],
            rows.loc[server + path, "attempts"],
        ) == (False, "image larger than 50000000 pixels (download.max_image_pixels)", 1), path
    assert rows.loc[server + "/small.png", "ok"]
    assert [p.read_bytes() for p in tmp_path.iterdir()] == [SMALL]


def test_downloader_pixel_limit_is_configurable(server, tmp_path):
    url = server + "/small.png"
    exact = download_images([url], tmp_path / "a", settings=Settings(max_image_pixels=768), progress=False)
    assert exact.loc[0, "ok"]
    over = download_images([url], tmp_path / "b", settings=Settings(max_image_pixels=767), progress=False)
    reason = "image larger than 767 pixels (download.max_image_pixels)"
    assert (over.loc[0, "ok"], over.loc[0, "reason"]) == (False, reason)
    # A cached file over a lowered limit is not trusted either (it is requested again, and refused).
    again = download_images([url], tmp_path / "a", settings=Settings(max_image_pixels=767), progress=False)
    assert (again.loc[0, "ok"], again.loc[0, "cached"], again.loc[0, "attempts"]) == (False, False, 1)


@pytest.mark.parametrize("size", [(8000, 8000), (20000, 20000)])
def test_load_image_names_the_file_and_the_limit(tmp_path, size):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(*size))
    with warnings.catch_warnings(), pytest.raises(ValueError) as raised:
        warnings.simplefilter("error")
        load_image(path)
    limit = f"image larger than {MAX_IMAGE_PIXELS} pixels (notice.workflow.runtime.load_image's limit)"
    assert str(raised.value) == f"{path}: {limit}"


def test_load_image_between_pil_limits_still_raises_our_error(tmp_path):
    """100 MP: PIL warns on open (it only raises above 179 MP); the outcome is still our ValueError."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(10000, 10000))
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError, match="image larger than 50000000"):
        load_image(path)


def test_load_image_limit_is_inclusive_and_the_image_is_rgb(tmp_path):
    path = tmp_path / "small.png"
    path.write_bytes(SMALL)
    image = load_image(path, max_pixels=768)
    assert (image.mode, image.size) == ("RGB", (32, 24))
    with pytest.raises(ValueError) as raised:
        load_image(path, max_pixels=767)
    assert str(raised.value) == f"{path}: image larger than 767 pixels (notice.workflow.runtime.load_image's limit)"


def test_load_image_still_names_undecodable_files(tmp_path):
    path = Path(tmp_path) / "truncated.png"
    path.write_bytes(SMALL[: len(SMALL) // 2])
    with pytest.raises(ValueError, match=f"^{path}: cannot decode image \\("):
        load_image(path)
