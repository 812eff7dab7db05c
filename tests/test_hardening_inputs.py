"""Issue 11, one small upload must not take the server down: the pixel budget
holds for every page and frame, elongated strips are refused, large slices are
downscaled, only allow-listed formats are opened (PostScript never reaches
Ghostscript), the deflated-DICOM guard keeps nothing, and library messages
never reach the user."""
from __future__ import annotations

import io
import logging
import os
import tracemalloc

import numpy as np
import pytest
from bad_inputs import (
    _dicom_meta_end,
    _with_transfer_syntax,
    ct_pattern,
    deflated_dicom,
    dicom_bytes,
    eps_bytes,
    hu_slice,
    png_bytes,
    tiff_pages,
)
from PIL import EpsImagePlugin, Image, ImageFile
from pydicom.uid import JPEGLSLossless

import ctapp.imaging as imaging
from ctapp.imaging import ALLOWED_FORMATS, MAX_ASPECT, MAX_SIDE, ImageDecodeError, decode


def grey(width: int, height: int, seed: int = 0) -> Image.Image:
    """A CT-like grey picture of any size (a 256 px pattern, stretched)."""
    pattern = Image.fromarray(np.round(ct_pattern(256, seed) * 255).astype(np.uint8))
    return pattern.resize((width, height), Image.Resampling.BILINEAR)


def saved(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Records every ImageFile.load (pixel decoding) instead of letting it happen."""
    calls = []

    def load(self):
        calls.append(self.size)
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


# ------------------------------------------------------------------ pixel budget


@pytest.fixture(scope="module")
def tiff_bomb() -> bytes:
    data = tiff_pages([(64, 64), (13000, 13000), (64, 64)])
    assert len(data) < 250_000
    return data


@pytest.mark.parametrize("frame", [None, 0, 2])
def test_every_tiff_page_is_checked_before_any_is_decoded(tiff_bomb, no_pixel_decoding, frame):
    """Whichever page is asked for, the 169-megapixel middle page refuses the file
    before a single page is decoded."""
    data = tiff_bomb
    with pytest.raises(ImageDecodeError, match=r"page 2: the image is 13000x13000 pixels \(169 megapixels\)"):
        decode(data, frame=frame)
    assert no_pixel_decoding == []


def test_a_tiff_page_of_other_size_is_the_one_checked_and_used():
    """Pages differ in size: the chosen page is decoded at its own size."""
    pages = io.BytesIO()
    grey(64, 64).save(pages, format="TIFF", save_all=True, append_images=[grey(96, 80, 1), grey(64, 64, 2)])
    image = decode(pages.getvalue())
    assert image.size == (96, 80)
    assert "frame 2 of 3" in " ".join(image.notes)


def _animated_png(frames: int, side: int = 32) -> bytes:
    images = [grey(side, side, seed) for seed in range(frames)]
    return saved(images[0], "PNG", save_all=True, append_images=images[1:])


def test_reaching_a_late_frame_of_an_animation_is_bounded_by_the_frames_before_it(monkeypatch, no_pixel_decoding):
    """An animated PNG's frame k is composed from frames 1..k on the full
    canvas: the work, not one frame's size, meets the frame budget."""
    monkeypatch.setattr(imaging, "MAX_FRAME_PIXELS", 3 * 32 * 32)  # frames 1-3 fit, frame 4 does not
    with pytest.raises(ImageDecodeError) as caught:
        decode(_animated_png(5), frame=3)
    assert str(caught.value) == (
        "the image has 5 frames of 32x32 pixels; reaching frame 4 means decoding 0 megapixels, more than this app "
        "accepts (0); export the slice as a single image")
    assert no_pixel_decoding == []


def test_a_file_of_too_many_pages_is_refused_before_any_is_decoded(monkeypatch, no_pixel_decoding):
    monkeypatch.setattr(imaging, "MAX_PAGES", 4)
    with pytest.raises(ImageDecodeError) as caught:
        decode(tiff_pages([(32, 32)] * 5))
    assert str(caught.value) == "upload: the file has more than 4 pages; export the slice as a single image"
    assert no_pixel_decoding == []


def test_the_frame_and_page_limits_are_inclusive(monkeypatch):
    monkeypatch.setattr(imaging, "MAX_FRAME_PIXELS", 3 * 32 * 32)
    monkeypatch.setattr(imaging, "MAX_PAGES", 4)
    assert decode(_animated_png(5)).notes == ["multi-frame image: used frame 3 of 5"]
    assert decode(tiff_pages([(32, 32)] * 4)).notes == ["multi-frame image: used frame 3 of 4"]
    # TIFF pages are read on their own: the animation's frame budget does not apply to them.
    assert decode(tiff_pages([(32, 32)] * 4), frame=3).notes == ["multi-frame image: used frame 4 of 4"]


@pytest.mark.parametrize("size", [(65000, 615), (40000, 1000), (615, 65000)])
def test_strips_are_refused_from_the_header(no_pixel_decoding, size):
    from bad_inputs import png_bomb

    data = png_bomb(*size, full=False)
    with pytest.raises(ImageDecodeError, match=f"{size[0]}x{size[1]} pixels, its long side .* at most {MAX_ASPECT}:1"):
        decode(data)
    assert no_pixel_decoding == []


def test_aspect_limit_is_inclusive():
    assert decode(np.zeros((64, 64 * MAX_ASPECT), np.float32)).size == (512, 64)
    # The narrowest slice over MAX_SIDE keeps a short side of MAX_SIDE / MAX_ASPECT when downscaled.
    assert decode(np.zeros((512, 512 * MAX_ASPECT), np.float32)).size == (MAX_SIDE, MAX_SIDE // MAX_ASPECT)
    with pytest.raises(ImageDecodeError, match="close to square"):
        decode(np.zeros((64, 64 * MAX_ASPECT + 1), np.float32))
    with pytest.raises(ImageDecodeError, match="close to square"):
        decode(dicom_bytes(np.zeros((600, 64), np.int16)))


def test_large_slices_are_downscaled_right_after_decoding():
    image = decode(png_bytes(grey(3000, 1500)))
    assert image.size == (MAX_SIDE, MAX_SIDE // 2)
    assert image.pixels.dtype == np.float32 and 0 <= image.pixels.min() and image.pixels.max() <= 1
    assert "downscaled from 3000x1500 to 2048x1024 pixels" in image.notes
    # The picture is kept: compare with the source reduced the same way.
    source = np.asarray(grey(3000, 1500).resize((2048, 1024), Image.Resampling.BOX), np.float32) / 255
    assert np.abs(image.pixels - source).mean() < 0.01


def test_large_dicom_keeps_hounsfield_units_at_the_display_size():
    image = decode(dicom_bytes(np.full((2100, 2100), 1024 + 40, np.int16)))  # 40 HU everywhere
    assert image.size == (MAX_SIDE, MAX_SIDE) and image.hu.shape == image.pixels.shape
    assert np.allclose(image.hu, 40.0)
    assert image.rewindow(imaging.MEDIASTINUM_WINDOW).pixels.shape == image.pixels.shape


def test_downscaling_averages_areas_and_invents_no_values_at_an_edge():
    """Area averaging: a sharp edge between air and bone stays within their
    values (an interpolating filter rings past both), and each side away from
    the edge keeps its value."""
    stored = np.full((2100, 2100), 1024 - 1000, np.int16)
    stored[:, 1050:] = 1024 + 1000
    image = decode(dicom_bytes(stored))
    assert image.hu.min() >= -1000 - 1e-3 and image.hu.max() <= 1000 + 1e-3
    assert np.allclose(image.hu[:, :1000], -1000) and np.allclose(image.hu[:, 1050:], 1000)


def test_slices_at_the_display_size_are_untouched():
    image = decode(png_bytes(grey(MAX_SIDE, 512)))
    assert image.size == (MAX_SIDE, 512)
    assert not any("downscaled" in note for note in image.notes)


# ------------------------------------------------------------------ formats by allow-list


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP", "JPEG2000"])
def test_allowed_formats_decode(fmt):
    if fmt not in ALLOWED_FORMATS:
        pytest.skip("this Pillow has no JPEG 2000 codec")
    image = decode(saved(grey(64, 48), fmt))
    assert image.source_format == fmt and image.size == (64, 48)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "ICO", "PPM", "PCX", "SGI", "DDS", "QOI", "EPS"])  # formats with a magic number
def test_other_formats_are_refused_by_name(fmt, no_pixel_decoding):
    data = eps_bytes() if fmt == "EPS" else saved(grey(32, 32).convert("RGB"), fmt)
    with pytest.raises(ImageDecodeError) as info:
        decode(data)
    message = str(info.value)
    assert f"{fmt} files are not accepted" in message and "PNG, JPEG, TIFF, BMP or DICOM" in message
    assert no_pixel_decoding == []


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that leaves a marker file whenever it runs."""
    marker = tmp_path / "GHOSTSCRIPT_RAN"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks for gs again
    return marker


def test_postscript_never_reaches_ghostscript(fake_ghostscript):
    for name, data in (("EPS", eps_bytes()), ("PS", b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")):
        with pytest.raises(ImageDecodeError, match="EPS files are not accepted"):
            decode(data)
        assert not fake_ghostscript.exists(), f"{name}: Ghostscript ran"
    # Control: Pillow left to itself does hand the same file to the fake gs (which then fails).
    with pytest.raises(Exception), Image.open(io.BytesIO(eps_bytes())) as opened:  # noqa: B017
        opened.load()
    assert fake_ghostscript.exists()


# ------------------------------------------------------------------ streaming limits


def test_deflated_dicom_bomb_is_measured_without_being_kept():
    bomb = deflated_dicom(hu_slice(64), padding=256 << 20)  # 1 MB that inflates to 256 MiB
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="deflated DICOM file inflates to more than"):
            decode(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(bomb) + 8 * imaging.INFLATE_CHUNK, f"{peak / 2**20:.0f} MiB held"


def test_the_inflated_size_is_counted_past_the_limit_by_a_single_byte():
    """The count stops only once it is over the limit: a stream of exactly
    one chunk more than the limit allows is not taken as fitting."""
    import zlib

    chunk = imaging.INFLATE_CHUNK

    def raw_deflate(data: bytes) -> memoryview:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return memoryview(packer.compress(data) + packer.flush())

    assert imaging._inflated_size(raw_deflate(bytes(chunk)), chunk) == chunk  # at the limit: fits
    assert imaging._inflated_size(raw_deflate(bytes(chunk + 1)), chunk) == chunk + 1  # one byte more: over
    assert imaging._inflated_size(raw_deflate(bytes(5 * chunk)), chunk) == 2 * chunk  # stops soon after the limit
    # A stream longer than a chunk (incompressible data) is fed to the inflater chunk after chunk.
    noise = np.random.default_rng(0).bytes(2 * chunk + 12345)
    assert imaging._inflated_size(raw_deflate(noise), 10 * chunk) == len(noise)


def test_a_truncated_deflated_dicom_is_refused_without_waiting_for_the_rest(caplog):
    """Counting the inflated size stops where the bytes stop, end of stream or not."""
    whole = deflated_dicom(hu_slice(64))
    with caplog.at_level(logging.INFO, logger="ctapp.imaging"), \
            pytest.raises(ImageDecodeError,
                          match="^the DICOM file could not be read: its header is damaged or incomplete$"):
        decode(whole[:-50])
    # The user reads the plain reason; the server log keeps what pydicom said.
    (record,) = [r for r in caplog.records if r.name == "ctapp.imaging"]
    assert record.getMessage() == "DICOM header unreadable" and record.exc_info is not None


def test_a_deflated_dicom_whose_stream_is_not_deflate_is_called_corrupt():
    whole = deflated_dicom(hu_slice(64))
    with pytest.raises(ImageDecodeError) as caught:
        decode(whole[:_dicom_meta_end(whole)] + b"\xff" * 200)
    assert str(caught.value) == "the deflated DICOM file is corrupt" and caught.value.__cause__ is None


def test_deflated_dicom_just_under_the_cap_still_decodes():
    padding = imaging.MAX_INFLATED_BYTES - 2**20
    image = decode(deflated_dicom(hu_slice(64), padding=padding))
    assert image.size == (64, 64) and image.hu is not None


# ------------------------------------------------------------------ messages are ours


def test_a_decoder_failure_is_named_for_the_user_and_logged_whole_for_the_server(caplog, monkeypatch):
    good = png_bytes(grey(64, 64))
    with caplog.at_level(logging.INFO, logger="ctapp.imaging"), pytest.raises(ImageDecodeError) as truncated:
        decode(good[: len(good) // 2])
    assert str(truncated.value) == "upload: the file is truncated or corrupt"
    (record,) = caplog.records
    assert record.getMessage() == "upload: decoder failure" and record.exc_info is not None
    caplog.clear()

    def fails(array):
        raise RuntimeError("a bug deep in a decoder")

    monkeypatch.setattr(imaging, "_from_array", fails)
    with caplog.at_level(logging.INFO, logger="ctapp.imaging"), pytest.raises(ImageDecodeError) as unexpected:
        decode(np.zeros((32, 32), np.float32))
    assert str(unexpected.value) == "could not decode the image (RuntimeError)"
    (record,) = caplog.records
    assert record.getMessage() == "decoder failure" and record.exc_info[0] is RuntimeError


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # the hostile UID is not a valid one
def test_library_messages_never_reach_the_user(caplog):
    good = png_bytes(grey(64, 64))
    corrupt = good[:-20] + b"\x00" * 8 + good[-12:]  # the last IDAT bytes and CRC broken
    with pytest.raises(Exception) as pillow_error:
        Image.open(io.BytesIO(corrupt)).load()
    with pytest.raises(ImageDecodeError) as ours:
        decode(corrupt)
    assert str(pillow_error.value) not in str(ours.value)
    assert "truncated or corrupt" in str(ours.value)

    # A transfer syntax UID is text from the file; pydicom's error repeats it.
    hostile = "1.2.826.0.[Session expired - sign in again](https://evil.example)"
    plain = dicom_bytes(encapsulated=b"\xff\xd8" + bytes(64), syntax=JPEGLSLossless)
    data = _with_transfer_syntax(plain[:_dicom_meta_end(plain)], hostile) + plain[_dicom_meta_end(plain):]
    with caplog.at_level(logging.INFO, logger="ctapp.imaging"), pytest.raises(ImageDecodeError) as info:
        decode(data)
    message = str(info.value)
    assert "could not be decoded" in message and "not a registered one" in message
    # pydicom's own words, with where it failed, go to the server log only.
    (record,) = [r for r in caplog.records if r.getMessage() == "DICOM pixel data undecodable"]
    assert record.exc_info is not None
    assert "evil" not in message and "[" not in message
