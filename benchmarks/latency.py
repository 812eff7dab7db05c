"""CPU latency of every shipped model on one 512x512 slice: ``predict`` and
``predict`` plus Grad-CAM (``analyse``) at each ``--precision`` (default fp32
and int8: one row each), side by side with a plain torch
forward of the same network at the same input size (fp32, contiguous, no
preprocessing: the network alone) and with a naive baseline (fp32 contiguous
model, PIL preprocessing, a separate pytorch-grad-cam call with default
settings after the prediction), all in the same run, interleaved so that load
from other processes hits each alike.

    .venv/bin/python benchmarks/latency.py [--models DIR ...] [--repeat 20] [--precision off int8] [--update-cards]
    .venv/bin/python benchmarks/latency.py --parity [--models DIR ...]

The goal of issue 26: ``predict`` at least 2x faster than the plain forward.
``--parity`` prints, per model, how far the fast path (fp32 batched in
channels_last, bf16 autocast forced, and int8) lands from the fp32 one-slice
reference on the parity test's generated slices and on real slices from
``../shared/data``: the measurement behind ``tests/test_parity.py``'s tolerance.
``--update-cards`` records the figures in each model card (``latency_ms``),
replacing the ones measured at the end of training, which shared the CPU with
whatever else ran then. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ctapp.checkpoint import atomic_write_text  # noqa: E402
from ctapp.inference import EnsembleModel  # noqa: E402
from ctapp.model_folders import CARD_FILE, list_models, load_model  # noqa: E402
from ctapp.models import create_model  # noqa: E402
from ctapp.precision import INFERENCE_CHOICES, Precision, cpu_has_fast_bf16, inference_precision  # noqa: E402
from training.foreign import ct_phantom  # noqa: E402


def slice_bytes(size: int = 512) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(ct_phantom(size)).save(buffer, format="PNG")
    return buffer.getvalue()


def side_by_side(runs: dict, repeat: int) -> dict[str, float]:
    """Median milliseconds of each function, run in turn ``repeat`` times after a
    warm-up, so that other processes' load falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeat):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def plain_forward(loaded):
    """The networks of a model (an ensemble's members) alone: fp32, contiguous,
    one (1, C, S, S) input each, under ``torch.no_grad``."""
    nets = []
    for member in loaded.members:
        net = create_model(member.arch, len(member.class_names), weights="none")
        net.load_state_dict(member.model.state_dict())
        config = member.preprocess
        nets.append((net.eval(), torch.randn(1, config.channels, config.img_size, config.img_size)))

    def forward():
        with torch.no_grad():
            for net, x in nets:
                net(x)
    return forward


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


def parity(folders: list[Path]) -> None:
    """How far the fast path lands from the fp32 one-slice reference."""
    from glob import glob

    from test_parity import compare, parity_slices

    real = [np.asarray(Image.open(path).convert("L")) for pattern in
            ("chest-ct-scan-images/Data/valid/*/*", "sarscov2-ctscan/*/*", "covid-ct-ucsd/*/*", "mosmed/*/*")
            for path in sorted(glob(str(ROOT.parent / "shared" / "data" / pattern)))[:3]]
    cpu = torch.device("cpu")
    print(f"largest probability difference from fp32 one slice at a time, and answer states that changed "
          f"({len(parity_slices())} generated slices, {len(real)} real ones; native bf16: {cpu_has_fast_bf16()})")
    for folder in folders:
        model = load_model(folder)
        for precision in (Precision(cpu, None), Precision(cpu, torch.bfloat16), inference_precision("int8")):
            for name, slices in (("generated", parity_slices()), ("real", real)):
                if slices:
                    difference, changed = compare(model, precision, slices)
                    print(f"{model.name:<16} {precision.describe():<30} {name:<9} {difference:.2e}  {changed}",
                          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, nargs="*", help="model folders (default: every shipped model)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--update-cards", action="store_true", help="write the figures into each model card")
    p.add_argument("--parity", action="store_true", help="the fast path's distance from fp32, not its speed")
    p.add_argument("--precision", nargs="+", choices=INFERENCE_CHOICES, default=["off", "int8"],
                   help="one row per precision (off: fp32; int8 needs the calibration files)")
    args = p.parse_args()
    folders = args.models or [m.path for m in list_models()]
    if not folders:
        sys.exit("no models found (train one, or pass --models)")
    if args.parity:
        return parity(folders)
    data = slice_bytes()
    print(f"median latency on one 512x512 PNG slice, {torch.get_num_threads()} threads, {args.repeat} runs, "
          f"default: {inference_precision().describe()}, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print(f"{'model':<18}{'precision':<40}{'predict':>10}{'+Grad-CAM':>11}{'plain fwd':>11}{'plain/predict':>15}   "
          f"{'naive predict':>14}{'naive +CAM':>12}")
    for folder in folders:
        model = load_model(folder)
        at = {}  # one loaded copy per precision, so the runs can alternate
        for choice in args.precision:
            at[choice] = load_model(folder)
            at[choice].set_precision(inference_precision(choice))
        runs = {"plain": plain_forward(model)}
        for choice, copy in at.items():
            runs |= {f"predict {choice}": lambda copy=copy: copy.predict(data),
                     f"analyse {choice}": lambda copy=copy: copy.analyse(data)}
        if not isinstance(model, EnsembleModel):  # an ensemble's members have their own naive figures
            naive = Naive(model)
            runs |= {"naive_predict": lambda: naive.predict(data),
                     "naive_predict_gradcam": lambda: naive.predict_and_explain(data)}
        ms = side_by_side(runs, args.repeat)
        naive_ms = {k: round(ms[k], 1) for k in ("naive_predict", "naive_predict_gradcam") if k in ms}
        shown = "".join(f"{naive_ms[k]:>12.1f}ms" for k in naive_ms) or f"{'(members)':>26}"
        for choice, copy in at.items():
            unavailable = "; ".join(m.int8_unavailable for m in copy.members if m.int8_unavailable)
            described = copy.members[0].precision.describe() + (" (fp32: no calibration)" if unavailable else "")
            print(f"{model.name:<18}{described:<40}{ms[f'predict {choice}']:>8.1f}ms{ms[f'analyse {choice}']:>9.1f}ms"
                  f"{ms['plain']:>9.1f}ms{ms['plain'] / ms[f'predict {choice}']:>14.2f}x {shown}", flush=True)
        ms["predict"], ms["analyse"] = ms[f"predict {args.precision[0]}"], ms[f"analyse {args.precision[0]}"]
        if args.update_cards:
            card_path = Path(folder) / CARD_FILE
            card = json.loads(card_path.read_text())
            card["latency_ms"] = {"predict": round(ms["predict"], 1), "predict_gradcam": round(ms["analyse"], 1),
                                  "plain_forward": round(ms["plain"], 1), **naive_ms, "image": "512x512",
                                  "threads": torch.get_num_threads(), "machine": platform.machine(),
                                  "precision": at[args.precision[0]].members[0].precision.describe(),
                                  "measured_by": "benchmarks/latency.py"}
            atomic_write_text(json.dumps(card, indent=2), card_path)


if __name__ == "__main__":
    main()
