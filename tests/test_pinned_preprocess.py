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


# --------------------------------------------------------------------------- scanner render


def chest_hu(size: int = 96) -> np.ndarray:
    """A body crop in HU: soft tissue, two lungs with vessels, air around."""
    from training.foreign import ct_phantom

    grey = ct_phantom(size).astype(np.float32) / 255
    return (-1000.0 + 1250.0 * grey).astype(np.float32)


def high_frequency_energy(image: np.ndarray) -> float:
    import cv2

    return float(np.mean(cv2.Laplacian(image.astype(np.float64), cv2.CV_64F) ** 2))


def test_a_sharp_kernel_raises_high_frequency_energy_and_a_smooth_one_lowers_it():
    from ctapp.preprocess import reconstruction_kernel

    hu = chest_hu()
    plain = high_frequency_energy(hu)
    assert high_frequency_energy(reconstruction_kernel(hu, 1.0)) > 2.0 * plain
    assert high_frequency_energy(reconstruction_kernel(hu, 0.5)) > 1.2 * plain
    assert high_frequency_energy(reconstruction_kernel(hu, -1.0)) < 0.5 * plain
    assert np.array_equal(reconstruction_kernel(hu, 0.0), hu)
    # On a coarser slice than the scanner's matrix the same kernel blurs fewer of its pixels.
    assert high_frequency_energy(reconstruction_kernel(hu, -1.0, pixel=0.4)) > \
        high_frequency_energy(reconstruction_kernel(hu, -1.0))
    assert abs(float(reconstruction_kernel(hu, 1.0).mean()) - float(hu.mean())) < 5.0  # detail, not brightness


def test_window_clipping_merges_grey_levels_that_equalisation_cannot_split_again():
    from ctapp.imaging import Window
    from ctapp.preprocess import equalise_intensity

    hu = np.repeat(np.linspace(-1000.0, 200.0, 121, dtype=np.float32)[None], 8, axis=0)  # 10 HU steps
    lung = np.round(Window(-600.0, 1500.0).apply(hu) * 255)  # -1350..150 HU: 5.9 HU a level
    narrow = np.round(Window(-500.0, 800.0).apply(hu) * 255)  # -900..-100 HU: 3.1 HU a level
    # Lung window: each step from -1000 to 140 HU its own level, 150..200 HU one white level.
    assert len(np.unique(lung)) == 115 + 1
    # Narrow window: -1000..-900 HU one black level, -890..-110 one level each, -100..200 HU one white level.
    assert narrow[0, 0] == narrow[0, 10] == 0 and narrow[0, 90] == narrow[0, 120] == 255
    assert len(np.unique(narrow)) == 1 + 79 + 1
    assert len(np.unique(equalise_intensity(narrow / 255))) <= len(np.unique(narrow))


def test_dose_noise_adds_its_spread_in_hu_and_nothing_else():
    from ctapp.preprocess import dose_noise

    hu = chest_hu()
    noise = np.random.default_rng(0).standard_normal(hu.shape).astype(np.float32)
    noisy = dose_noise(hu, 40.0, noise)
    assert np.allclose(noisy - hu, 40.0 * noise, atol=1e-3)
    assert abs(float((noisy - hu).std()) - 40.0) < 2.0


def test_a_thick_slice_blurs_the_periphery_more_the_thicker_it_is():
    from ctapp.preprocess import slice_thickness

    hu = chest_hu()
    assert np.array_equal(slice_thickness(hu, 1.0), hu) and np.array_equal(slice_thickness(hu, 0.6), hu)
    energies = [high_frequency_energy(slice_thickness(hu, mm)) for mm in (1.0, 2.0, 5.0)]
    assert energies[0] > energies[1] > energies[2]
    five = slice_thickness(hu, 5.0)
    centre, rim = np.s_[44:52, 44:52], np.s_[44:52, 2:10]
    assert np.abs(five - hu)[centre].mean() < np.abs(five - hu)[rim].mean()


def test_the_field_of_view_holds_the_crop_in_air_above_a_couch_inside_the_circle():
    from ctapp.preprocess import AIR_HU, OUTSIDE_FOV_HU, field_of_view

    hu = chest_hu(64)
    canvas = field_of_view(hu, body_share=0.5, offset=(0.25, 0.5), table_hu=-200.0, table_gap=0.0)
    assert canvas.shape == (128, 128)
    top, left = 16, 32  # a quarter and a half of the 64 free pixels
    assert np.array_equal(canvas[top:top + 64, left:left + 64], np.maximum(hu, AIR_HU))
    assert canvas[0, 0] == canvas[127, 127] == OUTSIDE_FOV_HU  # corners: outside the reconstruction circle
    assert canvas[64, 2] == AIR_HU  # beside the body, inside the circle
    # The couch right under the crop: 3 rows (2.5% of 128) from x 10 to 117, its core half-way to air.
    assert np.all(canvas[80, 10:118] == -200.0) and canvas[80, 9] == canvas[80, 118] == AIR_HU
    assert np.all(canvas[81, 12:116] == -600.0) and np.all(canvas[82, 10:118] == -200.0)
    assert field_of_view(hu, body_share=0.5, circle=False)[0, 0] == AIR_HU
    no_couch = field_of_view(hu, body_share=0.5, offset=(0.25, 0.5), table_hu=None, circle=False)
    assert np.all(no_couch[top + 64:] == AIR_HU)
    with pytest.raises(ValueError, match="body_share must be between 0.2 and 1"):
        field_of_view(hu, body_share=0.1)


def test_the_body_crop_finds_the_slice_again_in_the_full_field_of_view():
    from ctapp.imaging import Window
    from ctapp.preprocess import AIR_HU, SQUARE_SPAN_HU, field_of_view, to_square

    body = config(64, crop="body", intensity="equalise")
    original, _ = to_square(chest_hu(160) / 1250.0 + 0.8, body)
    square_hu = AIR_HU + SQUARE_SPAN_HU * original
    canvas = field_of_view(square_hu, body_share=0.6, offset=(0.3, 0.4), table_hu=-100.0)
    rendered, geometry = to_square(Window(-600.0, 1500.0).apply(canvas), body)
    top, left, bottom, right = geometry.box
    assert (bottom - top) < 0.75 * canvas.shape[0] and (right - left) < 0.75 * canvas.shape[1]
    assert np.corrcoef(rendered.ravel(), original.ravel())[0, 1] > 0.9


def test_the_scanner_render_keeps_shape_and_range_and_follows_the_models_preprocessing():
    from ctapp.preprocess import AUGMENT_LEVELS, ScannerRender, train_augment

    image = torch.from_numpy(chest_hu(64) / 1250.0 + 0.8).clamp(0, 1)[None]
    assert torch.equal(ScannerRender(p=0.0)(image), image)
    torch.manual_seed(3)
    first = ScannerRender(p=1.0)(image)
    torch.manual_seed(3)
    assert torch.equal(ScannerRender(p=1.0)(image), first)  # seeded: a resumed run repeats it
    assert first.shape == image.shape and first.dtype == torch.float32
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0 and not torch.equal(first, image)
    assert "scanner" in AUGMENT_LEVELS["scanner"][-1][0]
    renders = [t for t in train_augment("scanner", config(64, intensity="percentile")).transforms
               if isinstance(t, ScannerRender)]
    assert len(renders) == 1 and renders[0].config == {"crop": "none", "intensity": "percentile"}
    assert [t.config for t in train_augment("scanner").transforms if isinstance(t, ScannerRender)] == [
        {"crop": "body", "intensity": "equalise"}]
    assert not any(isinstance(t, ScannerRender) for t in train_augment("export").transforms)


def test_the_training_set_renders_scanner_slices_with_the_models_own_preprocessing():
    from ctapp.preprocess import ScannerRender
    from training.engine import SliceDataset

    dataset = SliceDataset(torch.zeros(2, 1, 32, 32), [0, 1], "scanner", config(32, crop="body", intensity="percentile"))
    assert [t.config for t in dataset.transform.transforms if isinstance(t, ScannerRender)] == [
        {"crop": "body", "intensity": "percentile"}]
