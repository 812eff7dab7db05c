"""The department's PACS over DICOMweb (``dicomweb-client``): a worklist of CT
studies (QIDO-RS), series retrieved instance by instance within the upload
limits (WADO-RS), and the series verdict stored back into the same study as
the DICOM SR the viewer builds (STOW-RS), optionally with the key slice and its
Grad-CAM as a secondary capture.

Configured by a ``[pacs]`` section of ``.streamlit/secrets.toml`` (docs/deploying.md,
"Reading from a PACS")::

    [pacs]
    url = "https://pacs.example.org/dicom-web"   # the DICOMweb root
    username = "ctapp"                           # HTTP basic auth ...
    password = "..."
    # token = "..."                              # ... or a bearer token
    verify_tls = true                            # or ca_bundle = "/etc/ssl/certs/hospital-ca.pem"
    connect_timeout = 5                          # seconds
    read_timeout = 60
    identifiers_for = ["clinician", "admin"]     # roles shown patient identifiers

Patient identifiers, accession numbers and free-text descriptions are held in
fields that never print (``repr=False``), are named in messages and records by
opaque ids only, and are kept out of the HTTP libraries' debug logs (their
query strings are hidden). The stored SR and capture carry the study's patient
module, as a PACS needs to file them beside the images; nothing else written
by the app does.

``python -m ctapp.pacs --since YYYY-MM-DD --model models/NAME`` classifies
every CT series not yet done by that model version and stores its verdict
(resumable: what was done is recorded in the app's store).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from .pacs_results import key_slice_capture, result_sr, result_uids
from .pacs_settings import PacsConfig, PacsConfigError, read_settings
from .series import classify_series, summarise
from .series_inputs import read_inputs
from .volumes import DEFAULT_LIMITS, Input, Limits, ReadBudget, Series, SeriesError, series_id_of

log = logging.getLogger(__name__)

ANY_SYNTAX = (("application/dicom", "*"),)  # instances as stored: the series reader decodes every syntax it knows
STUDY_FIELDS = ["StudyDescription", "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                "PatientName", "PatientID", "PatientBirthDate", "PatientSex"]
SERIES_FIELDS = ["SeriesDescription", "SeriesNumber", "Modality", "NumberOfSeriesRelatedInstances", "SliceThickness"]
STUDY_ATTRIBUTES = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyDescription"]
DUPLICATE_SOP_INSTANCE = 0x0111  # a STOW failure reason that means "already stored"


class PacsError(RuntimeError):
    """The PACS could not do what was asked; the message says why, by opaque ids only."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _HiddenQueries(logging.Filter):
    """urllib3, dicomweb-client and its retry helper log request URLs; QIDO
    query strings carry accession numbers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = re.sub(r"\?[^\s\"']*", "?<query hidden>", message), ()
        return True


for _name in ("urllib3.connectionpool", "dicomweb_client", "dicomweb_client.web", "retrying"):
    logging.getLogger(_name).addFilter(_HiddenQueries())


# --------------------------------------------------------------------------- what the PACS lists


@dataclass(frozen=True)
class Identifiers:
    """What identifies a patient or a study to people; shown only to the roles
    allowed, never printed, logged or recorded."""

    patient_name: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)
    birth_date: str = field(default="", repr=False)
    accession: str = field(default="", repr=False)
    description: str = field(default="", repr=False)


@dataclass(frozen=True)
class StudyEntry:
    uid: str = field(repr=False)
    date: str  # YYYY-MM-DD, or ''
    modalities: tuple[str, ...]
    series_count: int | None
    identifiers: Identifiers = field(repr=False)

    @property
    def key(self) -> str:
        """Opaque id of the study, for screens, messages and records."""
        return "T-" + hashlib.sha256(self.uid.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class SeriesEntry:
    study_uid: str = field(repr=False)
    uid: str = field(repr=False)
    modality: str
    number: int | None
    slices: int | None  # instances, as the PACS counts them
    thickness: float | None  # mm
    description: str = field(default="", repr=False)

    @property
    def key(self) -> str:
        """The opaque id the series viewer gives the same series."""
        return series_id_of(self.uid)

    @property
    def study_key(self) -> str:
        return "T-" + hashlib.sha256(self.study_uid.encode()).hexdigest()[:8]

    @property
    def record_key(self) -> str:
        """The store's key of the series: a full hash of its UID (no collisions across a PACS)."""
        return hashlib.sha256(self.uid.encode()).hexdigest()


@dataclass(frozen=True)
class Stored:
    sr_uid: str
    instances: int  # stored now (0: they were in the PACS already)


def _datasets(found: list[dict]):
    from pydicom.dataset import Dataset

    return [Dataset.from_json(item) for item in found]


def _uid(item: dict, tag: str) -> str:
    return str((item.get(tag, {}).get("Value") or [""])[0])


def _number(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value or "") >= 8 else ""


def _query_date(since: date | None, until: date | None) -> str:
    return f"{since.strftime('%Y%m%d') if since else ''}-{until.strftime('%Y%m%d') if until else ''}"


# --------------------------------------------------------------------------- the connection


class Pacs:
    """One DICOMweb connection (a ``requests`` session with its auth, TLS
    verification and timeouts)."""

    def __init__(self, config: PacsConfig):
        import requests
        from dicomweb_client import DICOMwebClient
        from requests.auth import HTTPBasicAuth

        self.config = config
        session = requests.Session()
        session.verify = config.verify
        # No gzip: instances are mostly pixels, and a PACS compressing every answer costs more than it
        # saves (Orthanc on loopback: 56 ms per 512x512 instance with gzip, 3 ms without).
        session.headers["Accept-Encoding"] = "identity"
        if config.username:
            session.auth = HTTPBasicAuth(config.username, config.password)
        elif config.token:
            session.headers["Authorization"] = f"Bearer {config.token}"
        self.client = DICOMwebClient(config.url, session=session,
                                     timeout=(config.connect_timeout, config.read_timeout))
        # dicomweb-client's retries repeat every failure, timeouts included (a slow PACS would cost
        # several read timeouts per request); a failed series is tried again by the next batch instead.
        self.client.set_http_retry_params(retry=False)

    def _call(self, action: str, function, *args, **kwargs):
        """``function(*args, **kwargs)``, its failures as :class:`PacsError`."""
        import requests

        host, config = self.config.host, self.config
        try:
            return function(*args, **kwargs)
        except requests.exceptions.SSLError:
            raise PacsError(f"The TLS certificate of the PACS at {host} could not be verified ({action}); set "
                            "[pacs] ca_bundle to your hospital's CA certificate") from None
        except (requests.exceptions.ConnectTimeout, requests.exceptions.ConnectionError) as exc:
            if isinstance(exc, requests.exceptions.ReadTimeout):
                raise self._slow(action) from None
            raise PacsError(f"The PACS at {host} cannot be reached ({action}): it may be down, or [pacs] url is "
                            "wrong") from None
        except requests.exceptions.Timeout:
            raise self._slow(action) from None
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise PacsError(f"The PACS at {host} refused the credentials (HTTP {status}, {action}): check [pacs] "
                                f"{'token' if config.token else 'username and password'}", status) from None
            if status == 404:
                raise PacsError(f"Not found in the PACS ({action}): it may have been deleted", status) from None
            raise PacsError(f"The PACS at {host} answered HTTP {status} ({action})", status) from None
        except (ValueError, KeyError):
            log.info("unexpected answer from the PACS (%s)", action, exc_info=True)
            raise PacsError(f"The PACS at {host} sent an answer that is not DICOMweb ({action})") from None

    def _slow(self, action: str) -> PacsError:
        return PacsError(f"The PACS at {self.config.host} did not answer within {self.config.read_timeout:g} s "
                         f"({action}); it may be overloaded: try again later, or raise [pacs] read_timeout")

    # ------------------------------------------------------------------ QIDO-RS

    def _search_all(self, action: str, function, uid_tag: str, *args, page: int = 500, **kwargs) -> list[dict]:
        """Every match of a QIDO-RS search, page by page. A page that brings
        nothing new ends it: some servers ignore ``offset`` with some filters
        (dicomweb-client's own paging then never ends)."""
        found: list[dict] = []
        seen: set[str] = set()
        while True:
            subset = self._call(action, function, *args, limit=page, offset=len(found), **kwargs)
            fresh = [item for item in subset if _uid(item, uid_tag) not in seen]
            seen.update(_uid(item, uid_tag) for item in fresh)
            found.extend(fresh)
            if len(subset) < page or not fresh:
                return found

    def studies(self, *, since: date | None = None, until: date | None = None, modality: str = "CT",
                accession: str = "", description: str = "", limit: int | None = 200) -> list[StudyEntry]:
        """Studies by date range (inclusive), modality in the study, accession
        number and a part of the study description (any case), newest first."""
        filters: dict[str, str] = {}
        if since or until:
            filters["StudyDate"] = _query_date(since, until)
        if modality:
            filters["ModalitiesInStudy"] = modality
        if accession.strip():
            filters["AccessionNumber"] = accession.strip()
        # The description is matched here, as a part in any case: PACSes differ in how they match
        # wildcards and case, and some (Orthanc 1.10) do not decode a percent-encoded '*' or space.
        wanted = description.strip().casefold()
        if wanted or limit is None:
            found = self._search_all("searching studies", self.client.search_for_studies, "0020000D",
                                     search_filters=filters, fields=STUDY_FIELDS)
        else:
            found = self._call("searching studies", self.client.search_for_studies, search_filters=filters,
                               fields=STUDY_FIELDS, limit=limit)
        studies = []
        for ds in _datasets(found):
            modalities = ds.get("ModalitiesInStudy") or []
            studies.append(StudyEntry(
                str(ds.StudyInstanceUID), _date(str(ds.get("StudyDate", ""))),
                tuple(str(m) for m in ([modalities] if isinstance(modalities, str) else modalities)),
                _number(ds.get("NumberOfStudyRelatedSeries")),
                Identifiers(str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or ""),
                            _date(str(ds.get("PatientBirthDate", "") or "")), str(ds.get("AccessionNumber", "") or ""),
                            str(ds.get("StudyDescription", "") or ""))))
        studies = [s for s in studies if wanted in s.identifiers.description.casefold()][:limit]
        return sorted(studies, key=lambda s: s.date, reverse=True)

    def series(self, study: StudyEntry | str, modality: str | None = None) -> list[SeriesEntry]:
        """The series of a study (only ``modality``'s when given), by series number."""
        study_uid = study.uid if isinstance(study, StudyEntry) else study
        filters = {"Modality": modality} if modality else None
        found = self._search_all("listing the series of a study", self.client.search_for_series, "0020000E",
                                 study_uid, search_filters=filters, fields=SERIES_FIELDS)
        out = []
        for ds in _datasets(found):
            thickness = ds.get("SliceThickness")
            out.append(SeriesEntry(study_uid, str(ds.SeriesInstanceUID), str(ds.get("Modality", "") or ""),
                                   _number(ds.get("SeriesNumber")), _number(ds.get("NumberOfSeriesRelatedInstances")),
                                   float(thickness) if thickness not in (None, "") else None,
                                   str(ds.get("SeriesDescription", "") or "")))
        return sorted(out, key=lambda s: (s.number is None, s.number or 0))

    # ------------------------------------------------------------------ WADO-RS

    def retrieve(self, entry: SeriesEntry, *, limits: Limits = DEFAULT_LIMITS,
                 on_progress: Callable[[int, int], None] | None = None) -> list[Input]:
        """The instances of a CT series as files, one request each, counted
        against the upload limits as they arrive; a non-CT or too large series
        is refused before anything is downloaded."""
        if entry.modality != "CT":
            raise PacsError(f"Series {entry.key} is {entry.modality or 'of no stated modality'}, not CT: only CT "
                            "series are classified")
        if entry.slices is not None and entry.slices > limits.max_slices:
            raise PacsError(f"Series {entry.key} has {entry.slices} instances; at most {limits.max_slices} slices "
                            "are read from one series (as for uploads), so it was not retrieved")
        try:
            found = self._search_all(f"listing the instances of series {entry.key}", self.client.search_for_instances,
                                     "00080018", entry.study_uid, entry.uid, fields=["SOPInstanceUID"])
        except PacsError as exc:
            raise (self._gone(entry, 0, None) if exc.status == 404 else exc) from None
        uids = [str(ds.SOPInstanceUID) for ds in _datasets(found)]
        if not uids:
            raise self._gone(entry, 0, None)
        if len(uids) > limits.max_slices:
            raise PacsError(f"Series {entry.key} has {len(uids)} instances; at most {limits.max_slices} slices are "
                            "read from one series")
        budget, files = ReadBudget(limits), []
        for k, uid in enumerate(uids):
            try:
                dataset = self._call(f"retrieving series {entry.key}, instance {k + 1} of {len(uids)}",
                                     self.client.retrieve_instance, entry.study_uid, entry.uid, uid,
                                     media_types=ANY_SYNTAX)
            except PacsError as exc:
                raise (self._gone(entry, k, len(uids)) if exc.status == 404 else exc) from None
            data = _file_bytes(dataset)
            del dataset
            try:
                budget.take(len(data), f"series {entry.key}")
            except SeriesError as exc:
                raise PacsError(f"{exc}; nothing of it was kept") from None
            files.append(Input(f"{entry.key}/{k + 1}", data))
            if on_progress:
                on_progress(k + 1, len(uids))
        return files

    @staticmethod
    def _gone(entry: SeriesEntry, read: int, total: int | None) -> PacsError:
        if total is None:
            return PacsError(f"Series {entry.key} is no longer in the PACS (deleted since the worklist was read)", 404)
        return PacsError(f"Series {entry.key} was deleted from the PACS during retrieval ({read} of {total} instances "
                         "read); nothing of it was kept", 404)

    def read_series(self, entry: SeriesEntry, *, limits: Limits = DEFAULT_LIMITS,
                    on_progress: Callable[[int, int], None] | None = None) -> Series:
        """The series retrieved and read exactly as an upload of its files."""
        result = read_inputs(self.retrieve(entry, limits=limits, on_progress=on_progress), limits=limits)
        if result.errors:
            raise PacsError("; ".join(e.message for e in result.errors))
        found = [s for s in result.series if s.kind == "DICOM"]
        if len(found) != 1:
            raise PacsError(f"Series {entry.key}: the PACS sent {len(found)} DICOM series for one")
        return found[0]

    # ------------------------------------------------------------------ STOW-RS

    def study_attributes(self, study_uid: str) -> dict[str, str]:
        """The study's patient and study attributes, for results filed beside it."""
        found = self._call("reading the study's attributes", self.client.search_for_studies,
                           search_filters={"StudyInstanceUID": study_uid}, fields=STUDY_ATTRIBUTES)
        if not found:
            raise PacsError("The study is no longer in the PACS; the result was not stored", 404)
        ds = _datasets(found)[0]
        return {k: str(ds.get(k, "") or "") for k in STUDY_ATTRIBUTES}

    def holds(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        try:
            found = self._call("looking for a stored result", self.client.search_for_instances, study_uid, series_uid,
                               search_filters={"SOPInstanceUID": sop_uid})
        except PacsError as exc:
            if exc.status == 404:
                return False
            raise
        return any(str(ds.get("SOPInstanceUID", "")) == sop_uid for ds in _datasets(found))

    def store_result(self, model, series: Series, result, *, capture: bool = False) -> Stored:
        """The series verdict as a DICOM SR (and, with ``capture``, its first
        key slice with the Grad-CAM overlay) in the source study. UIDs are
        derived from the model version and the series: a second store finds
        the first and writes nothing."""
        reference = series.reference
        if reference is None:
            raise PacsError(f"Series {series.id} has no DICOM references: only a DICOM series can be stored back")
        uids = result_uids(model.name, model.version, reference.series_uid)
        if self.holds(reference.study_uid, uids.series, uids.sr):
            log.info("result of series %s already in the PACS", series.id)
            return Stored(uids.sr, 0)
        study = self.study_attributes(reference.study_uid)
        summary = summarise(series.id, result)
        datasets = [result_sr(model, series, result, summary, uids, study)]
        if capture and summary.key_slices:
            datasets.append(key_slice_capture(model, series, summary.key_slices[0], uids, study))
        answer = self._call(f"storing the result of series {series.id}", self.client.store_instances, datasets,
                            reference.study_uid)
        failed = [item for item in answer.get("FailedSOPSequence", []) or []
                  if int(item.get("FailureReason", 0) or 0) != DUPLICATE_SOP_INSTANCE]
        if failed:
            reason = int(failed[0].get("FailureReason", 0) or 0)
            raise PacsError(f"The PACS refused to store the result of series {series.id} (STOW-RS failure reason "
                            f"0x{reason:04X}); it is not recorded as stored")
        if not self.holds(reference.study_uid, uids.series, uids.sr):  # accepted, then dropped by a rule of the PACS
            raise PacsError(f"The PACS at {self.config.host} accepted the result of series {series.id} but did not "
                            "keep it (a storage rule of the PACS may refuse results); it is not recorded as stored")
        log.info("result of series %s stored in the PACS", series.id)
        return Stored(uids.sr, len(datasets))


def _file_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the batch


@dataclass
class Outcome:
    """What happened to one series in a batch (opaque ids only)."""

    study: str
    series: str
    status: str  # "stored", "already stored", "failed"
    slices: int | None = None
    verdict: str = ""
    seconds: float = 0.0
    message: str = ""


def process_series(pacs: Pacs, model, entry: SeriesEntry, *, limits: Limits = DEFAULT_LIMITS,
                   capture: bool = False) -> Outcome:
    """Retrieve, classify and store back one series; a fault is the outcome's message."""
    started = time.perf_counter()
    outcome = Outcome(entry.study_key, entry.key, "failed", entry.slices)
    try:
        series = pacs.read_series(entry, limits=limits)
        result = classify_series(model, series)
        summary = summarise(series.id, result)
        stored = pacs.store_result(model, series, result, capture=capture)
        outcome.slices, outcome.verdict = len(series), summary.verdict
        outcome.status = "stored" if stored.instances else "already stored"
    except PacsError as exc:
        outcome.message = str(exc)
    outcome.seconds = time.perf_counter() - started
    return outcome


def run_batch(pacs: Pacs, store, model, *, since: date, until: date | None = None, limits: Limits = DEFAULT_LIMITS,
              capture: bool = False, user: str = "",
              on_progress: Callable[[int, int, Outcome | None], None] | None = None) -> list[Outcome]:
    """Every CT series of the studies from ``since`` to ``until`` that this
    model version has not yet stored a result for: each one processed and
    recorded in ``store`` (a committed row per series, so an interrupted
    batch resumes where it stopped). Raises :class:`PacsError` only when the
    PACS cannot even be searched."""
    done = store.pacs_done(model.name, model.version)
    todo = [entry for study in pacs.studies(since=since, until=until, limit=None)
            for entry in pacs.series(study, modality="CT") if entry.record_key not in done]
    outcomes = []
    if on_progress:
        on_progress(0, len(todo), None)
    for k, entry in enumerate(todo):
        outcome = process_series(pacs, model, entry, limits=limits, capture=capture)
        store.record_pacs_result(user=user, model=model.name, model_version=model.version, study=entry.study_key,
                                 series=entry.record_key, status=outcome.status, slices=outcome.slices,
                                 verdict=outcome.verdict, message=outcome.message)
        log.info("series %s: %s", outcome.series, outcome.status)
        outcomes.append(outcome)
        if on_progress:
            on_progress(k + 1, len(todo), outcome)
    return outcomes


def summary_table(outcomes: list[Outcome]) -> str:
    """The batch's outcomes as aligned text columns."""
    header = ("study", "series", "slices", "status", "seconds", "verdict or message")
    rows = [header] + [(o.study, o.series, "" if o.slices is None else str(o.slices), o.status, f"{o.seconds:.1f}",
                        o.message or o.verdict) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]) for r in rows)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ctapp.pacs", description=(
        "Classify every CT series of the PACS's studies since a day that the model version has not done yet, and "
        "store each verdict back as a DICOM SR. Resumable and idempotent; exit status 1 when any series failed."))
    parser.add_argument("--since", required=True, type=date.fromisoformat, help="first study day, YYYY-MM-DD")
    parser.add_argument("--until", type=date.fromisoformat, help="last study day, YYYY-MM-DD (default: no end)")
    parser.add_argument("--model", required=True, type=Path, help="model folder, e.g. models/covid-resnet50")
    parser.add_argument("--secrets", type=Path, default=Path(".streamlit/secrets.toml"),
                        help="the file with the [pacs] section (default: .streamlit/secrets.toml)")
    parser.add_argument("--capture", action="store_true",
                        help="also store the first key slice with its Grad-CAM as a secondary capture")
    return parser


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from .model_folders import load_model
    from .store import Store

    args = get_args_parser().parse_args(argv)
    try:
        config = read_settings(args.secrets)
    except PacsConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config is None:
        print(f"error: {args.secrets} has no [pacs] section (docs/deploying.md, 'Reading from a PACS')", file=sys.stderr)
        return 2
    model = load_model(args.model)
    bar = tqdm(total=0, unit="series", file=sys.stderr, desc="PACS batch")

    def progress(done: int, total: int, outcome: Outcome | None) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(f"{outcome.series} {outcome.status}" if outcome else "")
        bar.refresh()

    store = Store.from_environment()
    try:
        outcomes = run_batch(Pacs(config), store, model, since=args.since, until=args.until, capture=args.capture,
                             on_progress=progress)
    except PacsError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    bar.close()
    failed = sum(o.status == "failed" for o in outcomes)
    print(summary_table(outcomes) if outcomes else "No new CT series: every one was done by this model version.")
    print(f"{len(outcomes) - failed} of {len(outcomes)} series done, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
