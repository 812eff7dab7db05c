"""Images that are clearly not chest CT slices, generated on the fly, to measure
how often the out-of-distribution check flags them."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def foreign_images(size: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """name -> uint8 image (grey or RGB): blank, noise, a photo-like scene, a
    document, a chest-X-ray-like projection, a checkerboard, a smooth gradient,
    and CT-like slices of the head and the abdomen."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images: dict[str, np.ndarray] = {
        "white": np.full((size, size), 255, np.uint8),
        "black": np.zeros((size, size), np.uint8),
        "noise": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "checkerboard": (((x * 8).astype(int) + (y * 8).astype(int)) % 2 * 255).astype(np.uint8),
        "gradient": (x * 255).astype(np.uint8),
    }
    photo = Image.new("RGB", (size, size), (135, 190, 235))  # sky, grass, a house, a sun
    draw = ImageDraw.Draw(photo)
    draw.rectangle([0, size * 0.65, size, size], fill=(70, 140, 60))
    draw.rectangle([size * 0.3, size * 0.4, size * 0.6, size * 0.7], fill=(180, 80, 60))
    draw.polygon([(size * 0.25, size * 0.4), (size * 0.45, size * 0.2), (size * 0.65, size * 0.4)], fill=(110, 50, 40))
    draw.ellipse([size * 0.75, size * 0.08, size * 0.92, size * 0.25], fill=(250, 220, 60))
    images["photo"] = np.asarray(photo)
    page = Image.new("L", (size, size), 245)
    draw = ImageDraw.Draw(page)
    for row in range(12, size - 12, 14):
        draw.text((10, row), "Lorem ipsum dolor sit amet, consectetur", fill=20)
    images["document"] = np.asarray(page)
    # A frontal chest radiograph is bright bone/soft tissue with dark lung fields: the
    # opposite polarity of a CT lung window, and no round body outline.
    lungs = np.exp(-(((x - 0.32) / 0.13) ** 2 + ((y - 0.5) / 0.28) ** 2)) + \
        np.exp(-(((x - 0.68) / 0.13) ** 2 + ((y - 0.5) / 0.28) ** 2))
    ribs = 0.08 * np.sin(y * 60) * (lungs > 0.2)
    xray = 0.85 - 0.6 * lungs + ribs + rng.normal(0, 0.02, (size, size))
    images["xray_like"] = (np.clip(xray, 0, 1) * 255).astype(np.uint8)
    # CT slices of other body parts: a head (bright skull ring, even brain) and an
    # abdomen (soft tissue, spine, no air-filled lungs).
    radius = np.hypot((x - 0.5) / 0.38, (y - 0.5) / 0.45)
    head = np.where(radius < 1, 0.95, 0.0) + np.where(radius < 0.9, -0.45, 0.0)
    images["head_ct_like"] = (np.clip(head + rng.normal(0, 0.02, head.shape), 0, 1) * 255).astype(np.uint8)
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1
    spine = (x - 0.5) ** 2 + (y - 0.72) ** 2 < 0.05 ** 2
    gas = ((x - 0.4) ** 2 + (y - 0.45) ** 2 < 0.03 ** 2) | ((x - 0.62) ** 2 + (y - 0.5) ** 2 < 0.025 ** 2)
    abdomen = np.where(body, 0.55, 0.0) + np.where(spine, 0.4, 0.0) - np.where(gas, 0.5, 0.0)
    images["abdomen_ct_like"] = (np.clip(abdomen + rng.normal(0, 0.02, abdomen.shape), 0, 1) * 255).astype(np.uint8)
    return images


def ct_phantom(size: int = 512, seed: int = 0) -> np.ndarray:
    """A CT-like grey slice (body outline, two dark lungs) for timing and smoke tests."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.36) ** 2 < 1
    lungs = (((x - 0.32) / 0.12) ** 2 + ((y - 0.5) / 0.22) ** 2 < 1) | \
        (((x - 0.68) / 0.12) ** 2 + ((y - 0.5) / 0.22) ** 2 < 1)
    pixels = np.where(body, 0.55, 0.0) - np.where(lungs, 0.45, 0.0) + rng.normal(0, 0.02, (size, size))
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8)


FAR_FACTOR = 2.0
FAR_RULE = (f"{FAR_FACTOR:g} x the 99% quantile of the far scores (the largest per-stage ratio) of unseen chest "
            "CT slices: beyond it a slice is called 'not a chest CT'; beyond the other threshold only, 'unlike "
            "the training images'")


def far_threshold(scores) -> float:
    """The out-of-distribution score above which an image is not a chest CT at
    all (blank, photo, document, another body part), far beyond the unseen
    chest CT slices of validation."""
    return float(FAR_FACTOR * np.quantile(np.asarray(scores), 0.99))
