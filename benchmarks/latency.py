"""CPU latency of every shipped model on one 512x512 slice: ``predict`` and
``predict`` plus Grad-CAM (``analyse``), next to a naive baseline measured in
the same run (fp32 contiguous model, PIL preprocessing, a separate
pytorch-grad-cam call with default settings after the prediction).

    .venv/bin/python benchmarks/latency.py [--models DIR ...] [--repeat 20] [--update-cards]

``--update-cards`` records the figures in each model card (``latency_ms``),
replacing the ones measured at the end of training, which shared the CPU with
whatever else ran then. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctapp.checkpoint import atomic_write_text  # noqa: E402
from ctapp.inference import EnsembleModel  # noqa: E402
from ctapp.model_folders import CARD_FILE, list_models, load_model  # noqa: E402
from ctapp.models import create_model  # noqa: E402
from training.foreign import ct_phantom  # noqa: E402


def slice_bytes(size: int = 512) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(ct_phantom(size)).save(buffer, format="PNG")
    return buffer.getvalue()


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class Naive:
    """What a first version does: fp32 contiguous model, PIL resize, default pytorch-grad-cam."""

    def __init__(self, loaded):
        self.model = create_model(loaded.arch, len(loaded.class_names))
        self.model.load_state_dict(loaded.model.state_dict())
        self.model.eval()
        self.config = loaded.preprocess
        self.layer = self.model.get_submodule(loaded.spec.cam_layer)

    def tensor(self, data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((self.config.img_size,) * 2, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(self.config.mean).view(3, 1, 1), torch.tensor(self.config.std).view(3, 1, 1)
        return ((x - mean) / std)[None]

    def predict(self, data: bytes):
        with torch.no_grad():
            return torch.softmax(self.model(self.tensor(data)), 1)

    def predict_and_explain(self, data: bytes):
        from pytorch_grad_cam import GradCAM

        probs = self.predict(data)
        with GradCAM(model=self.model, target_layers=[self.layer]) as cam:
            heat = cam(input_tensor=self.tensor(data), targets=None)
        return probs, heat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, nargs="*", help="model folders (default: every shipped model)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--update-cards", action="store_true", help="write the figures into each model card")
    args = p.parse_args()
    folders = args.models or [m.path for m in list_models()]
    if not folders:
        sys.exit("no models found (train one, or pass --models)")
    data = slice_bytes()
    print(f"median latency on one 512x512 PNG slice, {torch.get_num_threads()} threads, {args.repeat} runs")
    print(f"{'model':<28}{'predict':>10}{'+Grad-CAM':>11}   {'naive predict':>14}{'naive +CAM':>12}")
    for folder in folders:
        model = load_model(folder)
        ours_p = median_ms(lambda: model.predict(data), args.repeat)
        ours_e = median_ms(lambda: model.analyse(data), args.repeat)
        naive_ms = {}
        if not isinstance(model, EnsembleModel):  # an ensemble's members have their own naive figures
            naive = Naive(model)
            naive_ms = {"naive_predict": round(median_ms(lambda: naive.predict(data), args.repeat), 1),
                        "naive_predict_gradcam": round(median_ms(lambda: naive.predict_and_explain(data),
                                                                 args.repeat), 1)}
        shown = "".join(f"{naive_ms[k]:>12.1f}ms" for k in naive_ms) or f"{'(members)':>26}"
        print(f"{model.name:<28}{ours_p:>8.1f}ms{ours_e:>9.1f}ms {shown}")
        if args.update_cards:
            card_path = Path(folder) / CARD_FILE
            card = json.loads(card_path.read_text())
            card["latency_ms"] = {"predict": round(ours_p, 1), "predict_gradcam": round(ours_e, 1), **naive_ms,
                                  "image": "512x512", "threads": torch.get_num_threads(),
                                  "machine": platform.machine(), "measured_by": "benchmarks/latency.py"}
            atomic_write_text(json.dumps(card, indent=2), card_path)


if __name__ == "__main__":
    main()
