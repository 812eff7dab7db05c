"""A CT series from the PACS against the same series uploaded as a zip:
retrieval (or reading the zip) plus classification, in one run.

    .venv/bin/python benchmarks/pacs.py [--model models/covid-resnet50] [--slices 300] [--size 512]

Generates ``--slices`` DICOM slices (``tests/orthanc_server.generated_series``:
int16 stored values with a rescale, 2.5 mm apart), loads them into a
throw-away Orthanc with its DICOMweb plugin on loopback (needs ``orthanc`` and
``orthanc-dicomweb``), then times, for the same model:

* PACS: the series listed (QIDO-RS), its instances retrieved one request each
  (WADO-RS) and read as an upload (``ctapp.pacs.Pacs.read_series``), then
  classified (``ctapp.series.classify_series``);
* zip: the files as one ``.zip`` upload read by ``ctapp.series_inputs.read_inputs``
  (inflating, grouping, ordering, decoding), then classified.

Both must give the same probabilities. The load average is printed with the
figures: other processes on the machine slow every figure.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from orthanc_server import OrthancServer, generated_series, orthanc_missing  # noqa: E402

from ctapp.model_folders import load_model  # noqa: E402
from ctapp.pacs import Pacs  # noqa: E402
from ctapp.pacs_settings import PacsConfig  # noqa: E402
from ctapp.series import classify_series  # noqa: E402
from ctapp.series_inputs import read_inputs  # noqa: E402
from ctapp.volumes import Input  # noqa: E402


def zipped(files: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for k, data in enumerate(files):
            archive.writestr(f"export/IM{k:04d}", data)
    return buffer.getvalue()


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "covid-resnet50"))
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    if orthanc_missing():
        print(f"skipped: {orthanc_missing()}")
        return 0
    files, seconds = timed(lambda: generated_series(args.slices, size=args.size, seed=0))
    total_mb = sum(map(len, files)) / 2**20
    print(f"series: {args.slices} slices of {args.size}x{args.size} int16, {total_mb:.0f} MB of DICOM "
          f"(generated in {seconds:.1f} s)")
    model = load_model(args.model)
    with OrthancServer() as orthanc:
        _, seconds = timed(lambda: orthanc.upload(files))
        print(f"loaded into Orthanc {orthanc.url} in {seconds:.1f} s")
        pacs = Pacs(PacsConfig.from_mapping(orthanc.pacs_settings()))
        (entry,), listing = timed(lambda: pacs.series(pacs.studies()[0], modality="CT"))
        retrieved, retrieval = timed(lambda: pacs.read_series(entry))
        from_pacs, pacs_classify = timed(lambda: classify_series(model, retrieved))
    archive = zipped(files)
    upload, reading = timed(lambda: read_inputs([Input("study.zip", archive)]).series[0])
    from_zip, zip_classify = timed(lambda: classify_series(model, upload))
    same = np.allclose(from_pacs.probabilities, from_zip.probabilities, rtol=0, atol=1e-6)
    load = os.getloadavg()
    print(f"model {model.name}; {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"{'':6} {'get the series':>15} {'classify':>9} {'total':>8}")
    pacs_get = listing + retrieval
    print(f"{'PACS':6} {pacs_get:14.1f}s {pacs_classify:8.1f}s {pacs_get + pacs_classify:7.1f}s   "
          f"(QIDO {listing:.2f} s, WADO-RS and reading {retrieval:.1f} s: {1000 * retrieval / args.slices:.0f} ms "
          "per instance)")
    print(f"{'zip':6} {reading:14.1f}s {zip_classify:8.1f}s {reading + zip_classify:7.1f}s   "
          f"(a {len(archive) / 2**20:.0f} MB zip read and decoded)")
    print(f"same probabilities: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
