"""Shortcut probe before and after preprocessing, per dataset and per source.

    .venv/bin/python benchmarks/shortcut_probe.py [DATA ...]

For each dataset: the audit's probe on the original files (image size and
brightness), then the probe on the model inputs (intensity statistics of the
square the model sees) without and with the body crop and intensity
standardisation. A probe near chance cannot tell the classes apart from how
the slices were exported.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctapp.audit import audit_dataset, input_shortcut_probe  # noqa: E402
from ctapp.data import scan_sources  # noqa: E402
from ctapp.preprocess import PreprocessConfig, load_squares  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DEFAULT = [DATA / "chest-ct-scan-images" / "Data", DATA / "sarscov2-ctscan", DATA / "covid-ct-ucsd", DATA / "mosmed"]
SETTINGS = {"pad + resize only": dict(crop="none", intensity="none"),
            "body crop": dict(crop="body", intensity="none"),
            "body crop + percentile": dict(crop="body", intensity="percentile"),
            "body crop + equalise": dict(crop="body", intensity="equalise")}


def main(roots: list[Path]) -> None:
    for root in roots:
        index = scan_sources([root])
        index.samples = [s for s in index.samples if s.split != "test"]
        audit = audit_dataset(index)
        kept = audit.kept_samples()
        probe = audit.shortcut
        print(f"{root.name}: {len(kept)} images after the audit, chance {probe['chance']:.2f}")
        print(f"  original files (size, brightness): {probe['accuracy']:.2f} +- {probe['accuracy_std']:.2f}")
        for name, options in SETTINGS.items():
            config = PreprocessConfig(img_size=128, **options)
            images = load_squares([s.path for s in kept], config).images
            result = input_shortcut_probe(images.numpy(), [s.label for s in kept])
            print(f"  model input, {name}: {result['accuracy']:.2f} +- {result['accuracy_std']:.2f}")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]] or DEFAULT)
