"""Preprocessing pinned to values computed by hand: the normalisation of a known
pixel per channel, where the padding puts a non-square slice, and where a
Grad-CAM map over the model input lands on the original image.

Each of these faults once survived the whole suite, because training and
inference share the code and so shift together (mean and std swapped, padding
not centred, the map cropped back at the wrong offset).
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from ctapp.preprocess import PreprocessConfig, cam_to_image, model_input, normalize, square

# mean != std in every channel, and no channel shares a value with another, so a
# swap of mean and std, or of two channels, changes every number below.
MEAN = (0.1, 0.2, 0.3)
STD = (0.5, 0.25, 0.125)


def config(size: int = 32, **extra) -> PreprocessConfig:
    return PreprocessConfig(img_size=size, mean=MEAN, std=STD, **extra)


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("value, expected", [
    (0.6, ((0.6 - 0.1) / 0.5, (0.6 - 0.2) / 0.25, (0.6 - 0.3) / 0.125)),  # 1.0, 1.6, 2.4
    (1.0, (1.8, 3.2, 5.6)),
])
def test_model_input_normalises_a_known_pixel_with_each_channels_mean_and_std(value, expected):
    pixels = np.full((32, 32), value, dtype=np.float32)
    x, _ = model_input(pixels, config())
    assert x.shape == (1, 3, 32, 32)
    for channel, want in enumerate(expected):
        assert torch.allclose(x[0, channel], torch.full((32, 32), want), atol=1e-5), (channel, want)


def test_normalize_subtracts_the_mean_and_divides_by_the_std_per_channel():
    grey = torch.tensor([[0.0, 0.25], [0.5, 1.0]]).view(1, 1, 2, 2)
    x = normalize(grey, config())
    assert x.shape == (1, 3, 2, 2)
    by_hand = [[[-0.2, 0.3], [0.8, 1.8]],  # (v - 0.1) / 0.5
               [[-0.8, 0.2], [1.2, 3.2]],  # (v - 0.2) / 0.25
               [[-2.4, -0.4], [1.6, 5.6]]]  # (v - 0.3) / 0.125
    assert torch.allclose(x[0], torch.tensor(by_hand), atol=1e-6)
    # A bf16 batch (autocast training) stays bf16: mean and std are cast to it, not it to fp32.
    half = normalize(grey.to(torch.bfloat16), config())
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), torch.tensor(by_hand)[None], atol=0.05)


def test_training_input_uses_the_same_hand_computed_normalisation():
    from training.engine import Precision, to_input

    grey = torch.full((2, 1, 4, 4), 0.6)
    x = to_input(grey, config(), Precision(torch.device("cpu"), None, channels_last=False))
    for channel, want in enumerate((1.0, 1.6, 2.4)):
        assert torch.allclose(x[:, channel], torch.full((2, 4, 4), want), atol=1e-5)


# --------------------------------------------------------------------------- padding


def _rows_with_content(x: torch.Tensor) -> list[int]:
    """Rows of channel 0 that differ from the normalised black padding."""
    black = (0.0 - MEAN[0]) / STD[0]
    return [r for r in range(x.shape[-2]) if not torch.allclose(x[0, 0, r], torch.full_like(x[0, 0, r], black))]


def test_percentile_standardisation_stretches_the_1st_to_99th_percentile_to_zero_to_one():
    from ctapp.preprocess import standardise_intensity

    ramp = np.linspace(0.0, 1.0, 10001, dtype=np.float32).reshape(1, -1)  # percentile p is the value p / 100
    out = standardise_intensity(ramp)
    at = {v: out[0, round(v * 10000)] for v in (0.005, 0.01, 0.02, 0.5, 0.99, 0.995)}
    assert at[0.005] == 0.0 and at[0.01] == pytest.approx(0.0, abs=1e-6)  # at and below the 1st: black
    assert at[0.02] == pytest.approx(0.01 / 0.98, abs=1e-5) and at[0.5] == pytest.approx(0.5, abs=1e-5)
    assert at[0.99] == pytest.approx(1.0, abs=1e-5) and at[0.995] == 1.0  # at and above the 99th: white
    assert out.dtype == np.float32


def test_square_pads_a_wide_slice_centred_at_the_hand_computed_offset():
    # 17 x 40 -> 40 x 40: (40 - 17) // 2 = 11 black rows above, 12 below.
    pixels = np.full((17, 40), 0.5, dtype=np.float32)
    pixels[0, 0] = 1.0  # marks the original's top-left corner
    out = np.asarray(square(pixels, 40)[0])
    assert out.shape == (40, 40)
    assert np.all(out[:11] == 0) and np.all(out[28:] == 0)
    assert out[11, 0] == pytest.approx(1.0)
    assert np.allclose(out[11:28, 1:], 0.5) and np.allclose(out[12:28, 0], 0.5)


def test_square_pads_a_tall_slice_centred_at_the_hand_computed_offset():
    pixels = np.full((40, 17), 0.5, dtype=np.float32)
    pixels[0, 0] = 1.0
    out = np.asarray(square(pixels, 40)[0])
    assert np.all(out[:, :11] == 0) and np.all(out[:, 28:] == 0)
    assert out[0, 11] == pytest.approx(1.0)


def test_square_pads_then_downsizes_with_the_border_rows_half_covered():
    # 30 x 60 -> padded 60 x 60 (content rows 15..44) -> 30 x 30 by area averaging:
    # output row r covers padded rows 2r and 2r+1, so rows 8..21 are content, rows 7
    # and 22 half content (0.25) and the rest black.
    pixels = np.full((30, 60), 0.5, dtype=np.float32)
    out = np.asarray(square(pixels, 30)[0])
    assert np.allclose(out[8:22], 0.5, atol=1e-6)
    assert np.allclose(out[7], 0.25, atol=1e-6) and np.allclose(out[22], 0.25, atol=1e-6)
    assert np.all(out[:7] == 0) and np.all(out[23:] == 0)


def test_model_input_centres_a_non_square_slice():
    x, _ = model_input(np.full((17, 40), 0.5, dtype=np.float32), config(40))
    assert _rows_with_content(x) == list(range(11, 28))


# --------------------------------------------------------------------------- Grad-CAM back onto the original


def _hot(size: int, row: int, col: int) -> np.ndarray:
    cam = np.zeros((size, size), dtype=np.float32)
    cam[row, col] = 1.0
    return cam


def test_cam_over_the_input_lands_at_the_hand_computed_spot_of_a_wide_original():
    # 40 x 64 at 64 px: no resizing, 12 padding rows above. Input pixel (30, 20) is
    # original pixel (30 - 12, 20) = (18, 20).
    x, geometry = model_input(np.full((40, 64), 0.5, dtype=np.float32), config(64))
    heat = cam_to_image(_hot(64, 30, 20), geometry)
    assert heat.shape == (40, 64)
    assert np.unravel_index(np.argmax(heat), heat.shape) == (18, 20)
    assert heat[18, 20] == pytest.approx(1.0)


def test_cam_over_the_input_lands_at_the_hand_computed_spot_of_a_tall_original():
    _, geometry = model_input(np.full((64, 40), 0.5, dtype=np.float32), config(64))
    heat = cam_to_image(_hot(64, 20, 30), geometry)
    assert heat.shape == (64, 40)
    assert np.unravel_index(np.argmax(heat), heat.shape) == (20, 18)


def test_cam_of_a_downsized_input_is_scaled_and_shifted_back():
    # 60 x 120 at 64 px: side 120, 30 padding rows, scale 120 / 64 = 1.875. Input pixel
    # (32, 32) has its centre at padded (32.5 * 1.875 - 0.5) = 60.4, i.e. original row
    # 60.4 - 30 = 30.4 and column 60.4.
    _, geometry = model_input(np.full((60, 120), 0.5, dtype=np.float32), config(64))
    heat = cam_to_image(_hot(64, 32, 32), geometry)
    assert heat.shape == (60, 120)
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(row - 30.4) <= 1 and abs(col - 60.4) <= 1


def _preprocess_options() -> list[dict]:
    """The default preprocessing, and a body crop where this version has one."""
    options = [{}]
    if "crop" in {f.name for f in fields(PreprocessConfig)}:
        options.append({"crop": "body"})
    return options


@pytest.mark.parametrize("extra", _preprocess_options(), ids=lambda e: e.get("crop", "default"))
@pytest.mark.parametrize("shape, marker", [((48, 96), (10, 70)), ((96, 48), (70, 10)), ((90, 150), (60, 110))])
def test_a_bright_spot_of_the_original_maps_to_the_input_and_back_to_the_same_spot(extra, shape, marker):
    """A marker in a non-square slice: where it lands in the model input, a CAM
    peak there must come back on the marker (within one input pixel's size)."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    body = ((y - h * 0.55) / (h * 0.42)) ** 2 + ((x - w * 0.5) / (w * 0.45)) ** 2 < 1  # off-centre body on black
    pixels = np.where(body, 0.4, 0.0).astype(np.float32)
    r, c = marker
    pixels[r - 1:r + 2, c - 1:c + 2] = 1.0
    assert body[r, c]
    size = 32
    tensor, geometry = model_input(pixels, config(size, **extra))
    peak = np.unravel_index(int(torch.argmax(tensor[0, 0])), (size, size))
    heat = cam_to_image(_hot(size, *peak), geometry)
    assert heat.shape == (h, w)
    back = np.unravel_index(np.argmax(heat), heat.shape)
    pixel = max(h, w) / size  # one input pixel in original pixels (upper bound with a crop)
    assert abs(back[0] - r) <= pixel and abs(back[1] - c) <= pixel, (back, marker, pixel)
