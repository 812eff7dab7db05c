"""Images that are clearly not chest CT slices, generated on the fly, to measure
how often the out-of-distribution check flags them."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


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


# The foreign-image set of benchmarks/gate.py: each kind in several variants, as
# the files a user would send (PNG, JPEG, DICOM), read by the app's own decoder.
# CT of other body parts, reformats and phantoms are Hounsfield units in CT DICOM,
# so they reach the model through the same window as a scanner's chest series.

@dataclass(frozen=True)
class ForeignImage:
    kind: str  # one of FOREIGN_KINDS
    name: str  # "kind/variant"
    data: bytes  # the file: PNG, JPEG or DICOM
    format: str  # "PNG", "JPEG" or "DICOM"


FOREIGN_KINDS = ("blank", "noise", "pattern", "photo", "document", "screenshot", "radiograph", "head_ct",
                 "abdomen_ct", "pelvis_ct", "coronal_reformat", "sagittal_reformat", "phantom")


def png_file(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_file(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def dicom_file(pixels: np.ndarray, modality: str = "CT") -> bytes:
    """A DICOM file of ``pixels``: Hounsfield units stored with a rescale for
    CT, raw detector values (no rescale) for a projection radiograph."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, \
        generate_uid

    ct = modality == "CT"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if ct else DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    stored = np.clip(np.round(pixels + (1024 if ct else 0)), 0, 65535).astype(np.uint16)
    if ct:
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates in [-1, 1]: x to the right, y down."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    return x, y


def _ellipse(x, y, cx, cy, ax, ay, degrees: float = 0.0) -> np.ndarray:
    t = np.radians(degrees)
    u, v = (x - cx) * np.cos(t) + (y - cy) * np.sin(t), -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
    return (u / ax) ** 2 + (v / ay) ** 2 < 1


def _scanned(hu: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A reconstruction's look: slight blur and quantum noise (HU)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(hu, 0.8) + rng.normal(0, noise, hu.shape)


def _table(hu: np.ndarray, x, y, height: float) -> np.ndarray:
    """The scanner's couch below the patient: a curved plate."""
    return np.where((np.abs(y - height - 0.05 * x ** 2) < 0.02) & (np.abs(x) < 0.9), 200.0, hu)


def head_ct(size: int, rng: np.random.Generator, scale: float = 1.0, ventricles: bool = True) -> np.ndarray:
    """HU of an axial head slice: skull, brain, ventricles."""
    x, y = _grid(size)
    ax, ay = 0.7 * scale, 0.85 * scale
    hu = np.full((size, size), -1000.0)
    hu[_ellipse(x, y, 0, 0, ax * 1.08, ay * 1.06)] = 40  # scalp
    hu[_ellipse(x, y, 0, 0, ax, ay)] = 1200  # skull
    hu[_ellipse(x, y, 0, 0, ax * 0.9, ay * 0.92)] = 35  # brain
    if ventricles:
        for side in (-1, 1):
            hu[_ellipse(x, y, side * 0.1 * scale, -0.05, 0.06 * scale, 0.25 * scale, side * 15)] = 5
    return _scanned(_table(hu, x, y, ay * 1.15), rng, 6)


def abdomen_ct(size: int, rng: np.random.Generator, width: float = 0.85, gas: int = 4) -> np.ndarray:
    """HU of an axial abdominal slice: fat, muscle, liver, kidneys, spine, aorta, bowel gas."""
    x, y = _grid(size)
    hu = np.full((size, size), -1000.0)
    hu[_ellipse(x, y, 0, 0.05, width, 0.62)] = -100  # subcutaneous fat
    hu[_ellipse(x, y, 0, 0.05, width - 0.07, 0.55)] = 45  # muscle and bowel
    hu[_ellipse(x, y, -0.35, -0.05, 0.35, 0.33, -20)] = 60  # liver (patient's right: image left)
    for side in (-1, 1):
        hu[_ellipse(x, y, side * 0.28, 0.32, 0.1, 0.14, side * 25)] = 150  # kidneys with contrast
    hu[_ellipse(x, y, 0, 0.45, 0.1, 0.09)] = 700  # vertebral body
    hu[_ellipse(x, y, 0.06, 0.28, 0.05, 0.05)] = 180  # aorta
    for _ in range(gas):
        hu[_ellipse(x, y, rng.uniform(0.0, 0.5), rng.uniform(-0.3, 0.2), rng.uniform(0.03, 0.08),
                    rng.uniform(0.03, 0.06))] = -950
    return _scanned(_table(hu, x, y, 0.72), rng, 15)


def pelvis_ct(size: int, rng: np.random.Generator, width: float = 0.9, bladder: float = 0.18) -> np.ndarray:
    """HU of an axial pelvic slice: fat, gluteal muscles, femoral heads and acetabula, bladder."""
    x, y = _grid(size)
    hu = np.full((size, size), -1000.0)
    hu[_ellipse(x, y, 0, 0.05, width, 0.58)] = -100
    hu[_ellipse(x, y, 0, 0.05, width - 0.08, 0.5)] = 50
    for side in (-1, 1):
        hu[_ellipse(x, y, side * 0.45, 0.05, 0.2, 0.22)] = 800  # acetabulum
        hu[_ellipse(x, y, side * 0.45, 0.05, 0.13, 0.13)] = 400  # femoral head
        hu[_ellipse(x, y, side * 0.3, 0.42, 0.22, 0.1, side * 20)] = 55  # gluteal muscle
    hu[_ellipse(x, y, 0, -0.15, bladder * 1.3, bladder)] = 8  # bladder
    hu[_ellipse(x, y, 0, 0.32, 0.06, 0.05)] = 700  # sacrum / coccyx
    return _scanned(_table(hu, x, y, 0.68), rng, 15)


def chest_volume(size: int = 128, seed: int = 0, lung_width: float = 0.3) -> np.ndarray:
    """HU of a synthetic chest CT volume (z from the neck down, then y, x in
    display orientation): body and fat, two lungs with domes and apices, heart,
    trachea, spine with discs, ribs, liver below the right dome, the couch."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:size, 0:size, 0:size] / (size - 1) * 2 - 1
    hu = np.full((size, size, size), -1000.0, np.float32)
    body = (x / 0.85) ** 2 + ((y - 0.05) / 0.6) ** 2 < 1
    hu[body] = -100
    hu[(x / 0.78) ** 2 + ((y - 0.05) / 0.53) ** 2 < 1] = 40
    ribs = (((x / 0.76) ** 2 + ((y - 0.05) / 0.51) ** 2) > 0.85) & (np.sin(z * 30) > 0.4)
    hu[ribs & ((x / 0.78) ** 2 + ((y - 0.05) / 0.53) ** 2 < 1)] = 650
    for side in (-1, 1):
        lung = ((x - side * 0.36) / lung_width) ** 2 + ((y + 0.02) / 0.4) ** 2 + ((z + 0.05) / 0.75) ** 2 < 1
        hu[lung] = -860
    hu[((x - 0.08) / 0.28) ** 2 + ((y + 0.05) / 0.3) ** 2 + ((z - 0.3) / 0.3) ** 2 < 1] = 40  # heart
    hu[((x + 0.3) / 0.45) ** 2 + ((y - 0.05) / 0.45) ** 2 + ((z - 0.95) / 0.3) ** 2 < 1] = 60  # liver
    hu[(x ** 2 + (y + 0.15) ** 2 < 0.05 ** 2) & (z < -0.2)] = -1000  # trachea
    spine = x ** 2 + ((y - 0.42) / 0.8) ** 2 < 0.1 ** 2
    hu[spine] = np.where(np.sin(z[spine] * 25) > -0.8, 700, 60)  # vertebrae and discs
    hu[(np.abs(y - 0.72 - 0.05 * x ** 2) < 0.02) & (np.abs(x) < 0.9)] = 200
    return (hu + rng.normal(0, 15, hu.shape)).astype(np.float32)


def reformats(volume: np.ndarray, plane: str, positions) -> list[np.ndarray]:
    """Coronal (fixed y) or sagittal (fixed x) slices of a volume, at fractions of its depth."""
    n = volume.shape[1]
    index = [int(p * (n - 1)) for p in positions]
    return [volume[:, i, :] if plane == "coronal" else volume[:, :, i] for i in index]


def radiograph(volume: np.ndarray, axis: int) -> np.ndarray:
    """A projection radiograph of a volume (1: frontal, 2: lateral): detector values, bone bright."""
    attenuation = np.clip(volume + 1000, 0, None).sum(axis=axis)
    return 4000 * (1 - np.exp(-attenuation / attenuation.max() * 3))


def shepp_logan(size: int, degrees: float = 0.0) -> np.ndarray:
    """The modified Shepp-Logan head phantom, values 0 .. 1."""
    x, y = _grid(size)
    image = np.zeros((size, size))
    for value, a, b, cx, cy, phi in SHEPP_LOGAN:
        image[_ellipse(x, y, cx, -cy, a, b, phi + degrees)] += value
    return np.clip(image, 0, 1)


SHEPP_LOGAN = ((1, .69, .92, 0, 0, 0), (-.8, .6624, .874, 0, -.0184, 0), (-.2, .11, .31, .22, 0, -18),
               (-.2, .16, .41, -.22, 0, 18), (.1, .21, .25, 0, .35, 0), (.1, .046, .046, 0, .1, 0),
               (.1, .046, .046, 0, -.1, 0), (.1, .046, .023, -.08, -.605, 0), (.1, .023, .023, 0, -.606, 0),
               (.1, .023, .046, .06, -.605, 0))


def text_page(size: int, rng: np.random.Generator, font_size: int, dark: bool = False,
               colour: bool = False) -> np.ndarray:
    background, ink = ((30, 30, 35), (220, 220, 220)) if dark else ((248, 248, 245), (20, 20, 20))
    page = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=font_size)
    words = ("patient report result normal finding lesion chest scan image dose the of and with "
             "window series study date signed radiology").split()
    for row in range(font_size, size - font_size, int(font_size * 1.5)):
        line = " ".join(rng.choice(words, 12))
        fill = tuple(int(c) for c in rng.integers(0, 200, 3)) if colour and rng.random() < 0.3 else ink
        draw.text((font_size // 2, row), line, fill=fill, font=font)
    return np.asarray(page)


def screenshot(size: int, rng: np.random.Generator, dark: bool, chart: bool) -> np.ndarray:
    """A window: title bar, side menu, buttons, and text or a bar chart."""
    image = Image.fromarray(text_page(size, rng, 11, dark=dark, colour=True))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, size, size // 12], fill=(60, 90, 160))
    draw.rectangle([0, size // 12, size // 5, size], fill=(225, 228, 232) if not dark else (50, 50, 60))
    for i in range(3):
        top = size // 6 + i * size // 8
        draw.rounded_rectangle([8, top, size // 5 - 8, top + size // 14], radius=4, fill=(70, 130, 220))
    if chart:
        draw.rectangle([size // 4, size // 3, size - 10, size - 10], fill=(255, 255, 255))
        bars = rng.uniform(0.2, 1.0, 6)
        for i, h in enumerate(bars):
            left = size // 4 + 10 + i * (size * 3 // 4 - 20) // 6
            draw.rectangle([left, size - 10 - int(h * size / 2), left + size // 16, size - 12], fill=(230, 120, 40))
    return np.asarray(image)


def _photos(size: int) -> list[np.ndarray]:
    """Real photographs shipped with scikit-learn (a temple, a flower), whole and cropped, colour and grey."""
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        h, w = photo.shape[:2]
        for crop in (photo, photo[: h // 2, : w // 2], photo[h // 3:, w // 3:]):
            out.append(np.asarray(Image.fromarray(crop).resize((size, size))))
        out.append(np.asarray(Image.fromarray(out[-3]).convert("L")))
    return out


def foreign_set(size: int = 256, seed: int = 0) -> list[ForeignImage]:
    """Every kind of :data:`FOREIGN_KINDS` in several variants, each the bytes of
    a file as it would be sent; none of them a chest CT slice."""
    rng = np.random.default_rng(seed)
    x, y = _grid(size)
    made: list[ForeignImage] = []

    def add(kind: str, variant: str, data: bytes, fmt: str) -> None:
        made.append(ForeignImage(kind, f"{kind}/{variant}", data, fmt))

    old = foreign_images(size, seed)
    for level, name in ((255, "white"), (0, "black"), (128, "grey"), (40, "dark")):
        add("blank", name, png_file(np.full((size, size), level, np.uint8)), "PNG")
    add("noise", "uniform", png_file(old["noise"]), "PNG")
    add("noise", "gaussian", png_file(np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8)), "PNG")
    add("noise", "salt_and_pepper", png_file((rng.random((size, size)) < 0.5).astype(np.uint8) * 255), "PNG")
    blobs = np.asarray(Image.fromarray(old["noise"]).filter(ImageFilter.GaussianBlur(6)), np.float64)
    add("noise", "blobs", png_file(((blobs - blobs.min()) / np.ptp(blobs) * 255).astype(np.uint8)), "PNG")
    add("pattern", "checkerboard", png_file(old["checkerboard"]), "PNG")
    add("pattern", "fine_checkerboard", png_file(((((x + 1) * 32).astype(int) + ((y + 1) * 32).astype(int)) % 2 * 255)
                                              .astype(np.uint8)), "PNG")
    add("pattern", "gradient", png_file(old["gradient"]), "PNG")
    radial = np.clip(1 - np.hypot(x, y) / 1.42, 0, 1)
    add("pattern", "radial_gradient", png_file((radial * 255).astype(np.uint8)), "PNG")
    add("pattern", "stripes", png_file(((np.sin(y * 40) > 0) * 255).astype(np.uint8)), "PNG")
    add("photo", "drawing", png_file(old["photo"]), "PNG")
    for i, photo in enumerate(_photos(size)):
        add("photo", f"sample_{i}", jpeg_file(photo), "JPEG")
    for font_size, variant in ((10, "small_print"), (16, "letter"), (24, "large_print")):
        add("document", variant, png_file(np.asarray(Image.fromarray(text_page(size, rng, font_size)).convert("L"))),
            "PNG")
    scanned = Image.fromarray(text_page(size, rng, 14)).convert("L").rotate(3, fillcolor=230)
    add("document", "scanned", jpeg_file(np.clip(np.asarray(scanned) + rng.normal(0, 12, (size, size)), 0, 255)
                                     .astype(np.uint8)), "JPEG")
    for dark in (False, True):
        for chart in (False, True):
            add("screenshot", f"{'dark' if dark else 'light'}_{'chart' if chart else 'text'}",
                png_file(screenshot(size, rng, dark, chart)), "PNG")
    add("radiograph", "drawn_chest", png_file(old["xray_like"]), "PNG")
    volume = chest_volume(size // 2, seed)
    wide = chest_volume(size // 2, seed + 1, lung_width=0.26)
    for name, axis, source in (("frontal", 1, volume), ("lateral", 2, volume), ("frontal_narrow", 1, wide)):
        projection = np.asarray(Image.fromarray(radiograph(source, axis).astype(np.float32)).resize((size, size)))
        add("radiograph", f"{name}_dicom", dicom_file(projection, modality="DX"), "DICOM")
        if axis == 1:
            add("radiograph", f"{name}_png", png_file((projection / projection.max() * 255).astype(np.uint8)), "PNG")
    for i, (scale, ventricles) in enumerate(((1.0, True), (0.8, True), (1.1, False), (0.9, True))):
        add("head_ct", f"dicom_{i}", dicom_file(head_ct(size, rng, scale, ventricles)), "DICOM")
    add("head_ct", "drawn_png", png_file(old["head_ct_like"]), "PNG")
    for i, (width, gas) in enumerate(((0.85, 4), (0.75, 8), (0.92, 2), (0.8, 0))):
        add("abdomen_ct", f"dicom_{i}", dicom_file(abdomen_ct(size, rng, width, gas)), "DICOM")
    add("abdomen_ct", "drawn_png", png_file(old["abdomen_ct_like"]), "PNG")
    for i, (width, bladder) in enumerate(((0.9, 0.18), (0.8, 0.1), (0.95, 0.25), (0.85, 0.05))):
        add("pelvis_ct", f"dicom_{i}", dicom_file(pelvis_ct(size, rng, width, bladder)), "DICOM")
    for plane in ("coronal", "sagittal"):
        positions = (0.45, 0.55, 0.65) if plane == "coronal" else (0.3, 0.5, 0.7)
        for label, source in (("", volume), ("narrow_", wide)):
            for position, image in zip(positions, reformats(source, plane, positions)):
                square = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                add(f"{plane}_reformat", f"{label}at_{position:g}", dicom_file(square), "DICOM")
    for degrees in (0, 10):
        sl = shepp_logan(size, degrees)
        add("phantom", f"shepp_logan_png_{degrees}", png_file((sl * 255).astype(np.uint8)), "PNG")
        add("phantom", f"shepp_logan_dicom_{degrees}", dicom_file(np.where(sl > 0, 30 + (sl - 0.2) * 1212, -1000)),
            "DICOM")
    water = np.where(np.hypot(x, y) < 0.8, 0.0, -1000.0)
    add("phantom", "water_cylinder", dicom_file(_scanned(water, rng, 10)), "DICOM")
    inserts = water.copy()
    for k, value in enumerate((-1000, -100, 120, 400, 900, -500)):
        angle = 2 * np.pi * k / 6
        inserts[np.hypot(x - 0.5 * np.cos(angle), y - 0.5 * np.sin(angle)) < 0.12] = value
    add("phantom", "calibration_inserts", dicom_file(_scanned(inserts, rng, 10)), "DICOM")
    return made


FAR_FACTOR = 2.0
FAR_RULE = (f"{FAR_FACTOR:g} x the 99% quantile of the far scores (the largest per-stage ratio) of unseen chest "
            "CT slices: beyond it a slice is called 'not a chest CT'; beyond the other threshold only, 'unlike "
            "the training images'")


def far_threshold(scores) -> float:
    """The out-of-distribution score above which an image is not a chest CT at
    all (blank, photo, document, another body part), far beyond the unseen
    chest CT slices of validation."""
    return float(FAR_FACTOR * np.quantile(np.asarray(scores), 0.99))
