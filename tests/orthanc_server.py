"""A throw-away Orthanc PACS with its DICOMweb plugin on loopback, for the PACS
tests, the benchmark and the local demo (Debian: ``apt-get install orthanc
orthanc-dicomweb``).

``orthanc_missing()`` says why none can be started (None when one can);
``OrthancServer()`` is a context manager that writes its own configuration
JSON into a fresh folder (storage and index there too), starts ``Orthanc`` on
a free 127.0.0.1 HTTP port with HTTP basic authentication (its own user and
random password), DICOM networking off, and stops it and removes the folder
on exit. A Debian system instance on the default ports is left alone.
"""
from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from pg_cluster import ThrowAwayServer, free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER = "ctapp"


def orthanc_missing() -> str | None:
    """Why no throw-away Orthanc can be started here, or None."""
    if not Path(ORTHANC).is_file():
        return f"Orthanc is not installed ({ORTHANC}): apt-get install orthanc orthanc-dicomweb"
    if not Path(DICOMWEB_PLUGIN).is_file():
        return f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}): apt-get install orthanc-dicomweb"
    return None


class OrthancServer(ThrowAwayServer):
    """``lua``: the text of a Lua script Orthanc runs (e.g. a filter that refuses instances)."""

    def __init__(self, lua: str | None = None):
        reason = orthanc_missing()
        if reason:
            raise RuntimeError(reason)
        self.password = secrets.token_urlsafe(12)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ctapp-orthanc-"))
        self.log = self.root / "orthanc.log"
        self.lua = lua
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def pacs_settings(self, **changes) -> dict:
        """The ``[pacs]`` section that points the app at this server."""
        return {"url": self.dicomweb_url, "username": USER, "password": self.password, **changes}

    def _config(self) -> dict:
        config = {
            "Name": "ctapp-test", "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"), "HttpPort": self.port, "DicomServerEnabled": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: self.password},
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpTimeout": 60, "KeepAlive": True, "StorageCompression": False, "ConcurrentJobs": 1,
            "HttpsVerifyPeers": False, "SaveJobs": False,
        }
        if self.lua:
            (self.root / "filter.lua").write_text(self.lua)
            config["LuaScripts"] = [str(self.root / "filter.lua")]
        return config

    def start(self) -> OrthancServer:
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=2))
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([ORTHANC, f"--logfile={self.log}", str(config)], stdout=out,
                                            stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                self.rest("GET", "/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not answer within 60 s")

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ Orthanc's own REST API

    def rest(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        """An authenticated call of Orthanc's REST API; the decoded JSON answer."""
        token = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Authorization": f"Basic {token}", "Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def upload(self, files: list[bytes]) -> None:
        for data in files:
            self.rest("POST", "/instances", data, "application/dicom")

    def lookup(self, uid: str) -> list[dict]:
        """Orthanc's resources (patients, studies, series, instances) with this DICOM UID."""
        return self.rest("POST", "/tools/lookup", uid.encode(), "text/plain")

    def delete_series(self, series_uid: str) -> None:
        for found in self.lookup(series_uid):
            if found["Type"] == "Series":
                self.rest("DELETE", f"/series/{found['ID']}")

    def study_series(self, study_uid: str) -> list[dict]:
        """Orthanc's series records of a study (every study resource with that UID)."""
        out = []
        for found in self.lookup(study_uid):
            if found["Type"] == "Study":
                out.extend(self.rest("GET", f"/studies/{found['ID']}/series"))
        return out



def generated_series(slices: int, *, size: int = 48, study_date: str = "20250105", modality: str = "CT",
                     study_uid: str | None = None, series_uid: str | None = None, description: str = "CT chest",
                     seed: int = 0, grey=None) -> list[bytes]:
    """DICOM files of one generated series (``series_synthetic``: a grey volume
    whose lung window shows the generated slices) in a study of the given day,
    modality and description; ``study_uid`` and ``series_uid`` add to an existing study or series. The
    headers carry the synthetic patient identifiers (``synthetic.PATIENT_NAME``).
    ``grey``: the (slices, size, size) uint8 volume to write instead."""
    import io

    import pydicom
    from pydicom.uid import generate_uid
    from series_synthetic import dicom_series, grey_volume

    study_uid = study_uid or generate_uid()
    files = []
    volume = grey if grey is not None else grey_volume(slices, size, seed=seed)
    for data in dicom_series(volume, series_uid=series_uid):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, study_date, "093000"
        ds.StudyDescription, ds.Modality = description, modality
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files
