"""The PACS connection on one machine, in one command: a throw-away Orthanc
with its DICOMweb plugin on loopback, loaded with CT series of today, and the
app pointed at it (its own ``[pacs]`` secrets file).

    .venv/bin/python deploy/pacs_demo.py [--port 8501] [--slices 40]

Needs Debian's ``orthanc`` and ``orthanc-dicomweb``. With ``../shared/data/mosmed``
beside the repository the series are real MosMedData slices (one study of
COVID slices, one of non-COVID ones; each slice is from another patient, so
the "series" are stacks, not volumes), else generated phantoms. Open
http://localhost:PORT, then "PACS worklist" -> "Search the PACS" -> "Open in the
series viewer" -> "Store result in PACS"; "PACS batch" classifies them all.
Ctrl-C stops the app and Orthanc and removes its storage.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from orthanc_server import OrthancServer, generated_series, orthanc_missing  # noqa: E402

MOSMED = ROOT.parent / "shared" / "data" / "mosmed"
SIZE = 512


def real_stack(folder: Path, slices: int) -> np.ndarray | None:
    """``slices`` MosMedData slices of one class as a (slices, 512, 512) grey stack."""
    from PIL import Image

    paths = sorted(folder.glob("*.jpg"))[:slices]
    if len(paths) < slices:
        return None
    return np.stack([np.asarray(Image.open(p).convert("L").resize((SIZE, SIZE))) for p in paths])


def demo_series(slices: int) -> list[list[bytes]]:
    today = date.today().strftime("%Y%m%d")
    stacks = [(name, real_stack(MOSMED / name, slices)) for name in ("COVID", "non-COVID")]
    if all(grey is not None for _, grey in stacks):
        return [generated_series(slices, study_date=today, description=f"CT chest (MosMedData {name})", grey=grey)
                for name, grey in stacks]
    return [generated_series(slices, size=256, study_date=today, seed=seed) for seed in (1, 2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--slices", type=int, default=40)
    args = parser.parse_args()
    if orthanc_missing():
        print(f"error: {orthanc_missing()}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped like Ctrl-C: Orthanc and its storage go too
    with OrthancServer() as orthanc, tempfile.TemporaryDirectory(prefix="ctapp-pacs-demo-") as folder:
        for files in demo_series(args.slices):
            orthanc.upload(files)
        secrets = Path(folder) / "secrets.toml"
        secrets.write_text("[pacs]\n" + "".join(f'{k} = "{v}"\n' for k, v in orthanc.pacs_settings().items()))
        print(f"Orthanc with DICOMweb at {orthanc.dicomweb_url} (2 CT studies of today); the app at "
              f"http://localhost:{args.port} -> PACS worklist. Ctrl-C stops both.", flush=True)
        try:
            return subprocess.call([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port",
                                    str(args.port), "--secrets.files", str(secrets)], cwd=ROOT)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
