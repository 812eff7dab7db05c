"""Untrained baseline models for tests that need a model but not a trained
one: :func:`tiny_model` builds a :class:`LoadedModel`,
:func:`write_model_folder` a model folder; :func:`hammer_model` shares one
between threads and checks every answer.
"""
from __future__ import annotations

import json
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bad_inputs import ct_pattern


def tiny_network(num_classes: int = 2, img_size: int = 48, seed: int = 0):
    """An untrained baseline CNN (seeded weights) and checkpoint metadata."""
    import torch

    from ctapp.models import create_model
    from ctapp.preprocess import PreprocessConfig, normalize

    torch.manual_seed(seed)
    model = create_model("baseline", num_classes)
    # Batch-norm statistics from a few CT-like pictures (fresh ones are 0/1,
    # which makes every image score about the same): outputs then differ
    # from image to image, so a mix-up between requests shows.
    config = PreprocessConfig(img_size=img_size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            batch = torch.stack([torch.from_numpy(np.float32(
                ct_pattern(img_size, s)))[None] for s in range(seed, seed + 16)])
            model(normalize(batch, config))
        model.classifier[1].weight.mul_(20.0)
    model.eval()
    meta = {"arch": "baseline", "class_names": [f"class{i}" for i in range(num_classes)],
            "preprocess": PreprocessConfig(img_size=img_size).to_dict(), "name": "tiny"}
    return model, meta


def tiny_model(num_classes: int = 2, img_size: int = 48, seed: int = 0):
    """An untrained baseline CNN as a LoadedModel."""
    from ctapp.inference import LoadedModel

    return LoadedModel(*tiny_network(num_classes, img_size, seed))


def write_model_folder(folder: Path, num_classes: int = 2, seed: int = 0) -> Path:
    """A model folder as training writes it: model.pt plus a model card that
    records the weights' SHA-256."""
    from ctapp.checkpoint import save_model_file, sha256_file

    model, meta = tiny_network(num_classes, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_model_file(folder / "model.pt", model, meta)
    card = {"name": folder.name, "classes": meta["class_names"], "weights_sha256": sha256_file(folder / "model.pt")}
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def sample_images(count: int, size: int = 64) -> list[np.ndarray]:
    """Distinct grey uint8 pictures (passed to predict/explain as arrays)."""
    return [np.round(ct_pattern(size, seed) * 255).astype(np.uint8) for seed in range(count)]


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@dataclass
class HammerResult:
    requests: int = 0
    predicts: int = 0
    explains: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)

    def growth(self, since: float) -> int:
        """RSS growth from the first sample at or after ``since`` seconds to the end."""
        base = next(b for t, b in self.rss if t >= since)
        return self.rss[-1][1] - base


def expected_results(loaded, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Single-threaded probabilities and Grad-CAMs of every image."""
    probs = [np.array(list(loaded.predict(img).probabilities.values())) for img in images]
    cams = [loaded.explain(img) for img in images]
    return probs, cams


def hammer_model(loaded, images: list[np.ndarray], *, threads: int = 8, seconds: float = 10.0,
                 warmup: float = 3.0, explain_every: int = 3, rtol: float = 1e-5, atol: float = 1e-6,
                 expected: tuple | None = None) -> HammerResult:
    """``threads`` threads call ``predict`` and ``explain`` on one shared model
    for ``warmup`` + ``seconds``; every answer is compared with the
    single-threaded one for the same image. RSS is sampled every 0.5 s; the
    same threads run the warm-up, so their allocator arenas and torch
    thread-local caches exist before the measured part."""
    expected_probs, expected_cams = expected or expected_results(loaded, images)
    result = HammerResult()
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + warmup + seconds

    def worker(k: int) -> None:
        n = 0
        while time.monotonic() < stop:
            i = (k * 7 + n) % len(images)
            try:
                if (n + k) % explain_every == 0:
                    got = loaded.explain(images[i])
                    ok = got.shape == expected_cams[i].shape and np.allclose(got, expected_cams[i], rtol=rtol, atol=atol)
                    what = "explain"
                else:
                    probs = np.array(list(loaded.predict(images[i]).probabilities.values()))
                    ok = np.allclose(probs, expected_probs[i], rtol=rtol, atol=atol)
                    what = "predict"
            except Exception as exc:  # noqa: BLE001
                with lock:
                    result.errors.append(f"thread {k}: {type(exc).__name__}: {exc}")
                return
            with lock:
                result.requests += 1
                result.explains += what == "explain"
                result.predicts += what == "predict"
                if not ok:
                    result.mismatches.append(f"thread {k}: {what} of image {i} differs from single-threaded")
            n += 1

    workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in workers:
        t.start()
    while any(t.is_alive() for t in workers):
        result.rss.append((time.monotonic() - start, rss_bytes()))
        time.sleep(0.5)
    for t in workers:
        t.join()
    result.rss.append((time.monotonic() - start, rss_bytes()))
    return result
