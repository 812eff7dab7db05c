"""Streamlit caches of the app; the only module of ``ctapp`` that imports Streamlit.

* Loaded models are resources (``st.cache_resource``): one instance per
  process, shared by every session; :class:`~ctapp.inference.LoadedModel`
  serialises its forward passes, so sharing is safe.
* Reports, model lists, training histories, predictions and Grad-CAMs are data
  (``st.cache_data``), keyed by the file's modification time so that a
  retrained model or a rewritten report is read again.
* The store (audit log and evaluation index) is a resource, one per
  database URL or log path.
* A series' classification is a resource too: one background run
  (:class:`~ctapp.series_background.BackgroundClassification`) per series and
  model, which every session showing that series reads as it progresses.
* Sign-in: ``st.login`` (OIDC) when ``.streamlit/secrets.toml`` has ``[auth]``;
  roles come from its ``[roles]`` section (:mod:`ctapp.auth`).
* Folder evaluations take the process-wide :func:`evaluation_slot`: one at a
  time, whoever asks.

Uploaded images are keyed by their SHA-256, never by name. Every cache that
holds images, maps or reports is bounded in entries and expires: an analysis
holds the slice, its map and (DICOM) its Hounsfield units, up to three
2048x2048 float arrays after decoding's downscale, so 16 entries are at most
~800 MB whatever the uploads.
"""
from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from .auth import RoleConfig, User, user_from_claims
from .evaluation import predictions_path, read_predictions
from .figures import read_history
from .inference import Analysis, LoadedModel, Prediction
from .model_folders import ModelEntry, list_models, load_model, model_dirs, model_stamp
from .store import DATABASE_URL_ENV, Store, configured_location

HISTORY_FILE = "history.csv"
AUDIT_FILE = "audit.json"
TTL = "15m"  # an upload's results outlive its tab by this much at most
MAX_ANALYSES = 16
_evaluation_lock = threading.Lock()


def stamp(path: str | Path) -> float:
    """Modification time of ``path`` (0 when it does not exist): part of every cache key."""
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------- models


@st.cache_data(max_entries=16, ttl=20, show_spinner=False)
def _models(dirs: tuple[str, ...], stamps: tuple[float, ...]) -> list[ModelEntry]:
    return list_models([Path(d) for d in dirs])


def models() -> list[ModelEntry]:
    """Every model folder of the model directories (re-listed when one is added)."""
    dirs = model_dirs()
    return _models(tuple(str(d) for d in dirs), tuple(stamp(d) for d in dirs))


def models_by_task() -> dict[str, list[ModelEntry]]:
    """The models grouped by task, tasks in the order their first model is listed;
    when there is none, the page is told how to get one."""
    tasks: dict[str, list[ModelEntry]] = {}
    for entry in models():
        tasks.setdefault(entry.task, []).append(entry)
    if not tasks:
        st.warning("**No trained models were found.** Train one, for example\n\n"
                   "`python -m training.fit --data DATA_FOLDER --arch resnet50 --out models/NAME`\n\n"
                   "then reload this page. Models are read from `models/` in the app folder and from the folders "
                   "listed in the `CTAPP_MODELS_DIR` environment variable.", icon=":material/info:")
    return tasks


def sidebar_model_choice(by_task: dict[str, list[ModelEntry]], key: str) -> ModelEntry:
    """A task, then one of its models, in the sidebar; ``key`` keeps each page's
    choice apart (the widgets are ``{key}_task`` and ``{key}_model_{task}``)."""
    st.sidebar.header("Model")
    task = st.sidebar.selectbox("Task", list(by_task), key=f"{key}_task")
    paths = {str(e.path): e for e in by_task[task]}
    chosen = st.sidebar.selectbox("Model", list(paths), format_func=lambda p: paths[p].name,
                                  key=f"{key}_model_{task}")
    return paths[chosen]


@st.cache_resource(max_entries=6, show_spinner="Loading the model...")
def _load_model(path: str, weights_stamp: float) -> LoadedModel:
    return load_model(path)


def loaded_model(path: str | Path) -> LoadedModel:
    """The process-wide instance of the model in folder ``path``."""
    path = Path(path).resolve()
    return _load_model(str(path), model_stamp(path))


@st.cache_data(max_entries=1024, ttl=TTL, show_spinner=False)
def _predict(path: str, weights_stamp: float, sha256: str, _data: bytes) -> Prediction:
    return _load_model(path, weights_stamp).predict(_data)


def predict(path: str | Path, sha256: str, data: bytes) -> Prediction:
    """Prediction of the model in ``path`` for uploaded file bytes with hash ``sha256``.

    Raises :class:`~ctapp.imaging.ImageDecodeError` for a file that is not a usable slice.
    """
    path = Path(path).resolve()
    return _predict(str(path), model_stamp(path), sha256, data)


@st.cache_data(max_entries=MAX_ANALYSES, ttl=TTL, show_spinner=False)
def _analyse(path: str, weights_stamp: float, sha256: str, method: str, target: str | None,
             _data: bytes) -> Analysis:
    return _load_model(path, weights_stamp).analyse(_data, target=target, method=method)


def analyse(path: str | Path, sha256: str, data: bytes, *, method: str = "Grad-CAM",
            target: str | None = None) -> Analysis:
    """Prediction plus class-activation map (``method``) for class ``target``
    (a class key; None explains the predicted class)."""
    path = Path(path).resolve()
    return _analyse(str(path), model_stamp(path), sha256, method, target, data)


# --------------------------------------------------------------------------- reports and cards


@st.cache_data(max_entries=256, ttl=TTL, show_spinner=False)
def _read_json(path: str, file_stamp: float) -> dict | None:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_json(path: str | Path) -> dict | None:
    """A JSON object file (evaluation report, audit, card); None when absent or unreadable."""
    return _read_json(str(path), stamp(path))


@st.cache_data(max_entries=64, ttl=TTL, show_spinner=False)
def _predictions(report_path: str, csv_stamp: float) -> list[dict]:
    return read_predictions(report_path)


def predictions(report_path: str | Path) -> list[dict]:
    """Per-image rows of an evaluation report (empty when it has no CSV)."""
    return _predictions(str(report_path), stamp(predictions_path(Path(report_path))))


@st.cache_data(max_entries=64, ttl=TTL, show_spinner=False)
def _history(path: str, file_stamp: float) -> list[dict]:
    try:
        return read_history(path)
    except (OSError, ValueError, csv.Error):
        return []


def history(model_folder: str | Path) -> list[dict]:
    """The model folder's training history (``history.csv``); empty when absent."""
    path = Path(model_folder) / HISTORY_FILE
    return _history(str(path), stamp(path))


def dataset_audit(model_folder: str | Path) -> dict | None:
    """The full dataset audit training wrote beside the model (``audit.json``)."""
    return read_json(Path(model_folder) / AUDIT_FILE)


# --------------------------------------------------------------------------- audit log


@st.cache_resource(show_spinner=False)
def _store(location: str, is_url: bool) -> Store:
    return Store(url=location) if is_url else Store(location)


def audit_log() -> Store:
    """The store of this server: PostgreSQL at ``CTAPP_DATABASE_URL`` when set,
    else the SQLite log at ``CTAPP_AUDIT_LOG`` (or the default path)."""
    return _store(configured_location(), bool(os.environ.get(DATABASE_URL_ENV, "").strip()))


# --------------------------------------------------------------------------- folder evaluations


@contextmanager
def evaluation_slot() -> Iterator[bool]:
    """Whether this caller may run a folder evaluation now (True while it
    holds the process's only slot; False when another evaluation runs)."""
    acquired = _evaluation_lock.acquire(blocking=False)
    try:
        yield acquired
    finally:
        if acquired:
            _evaluation_lock.release()


# --------------------------------------------------------------------------- sign-in and roles


def sign_in_enabled() -> bool:
    """Whether ``.streamlit/secrets.toml`` configures sign-in (an ``[auth]`` section)."""
    try:
        return "auth" in st.secrets
    except FileNotFoundError:  # no secrets file at all
        return False


def role_config() -> RoleConfig:
    try:
        section = st.secrets.get("roles")
    except FileNotFoundError:
        section = None
    return RoleConfig.from_mapping(section)


def current_user() -> User | None:
    """The signed-in user; None when sign-in is off or nobody has signed in."""
    if not sign_in_enabled() or not st.user.is_logged_in:
        return None
    return user_from_claims(st.user.to_dict(), role_config())


def legacy_pages_run() -> bool:
    """Whether this script run came through Streamlit's legacy multipage mode (and
    leave that mode for the whole process).

    Streamlit treats a ``pages/`` folder beside the main script as the legacy
    multipage app until some session calls ``st.navigation``: its class-wide
    ``PagesManager.uses_pages_directory`` is set from the folder's existence when
    the server's first session starts and cleared only by ``st.navigation``. On a
    freshly started server, until someone had opened ``/``, a request for
    ``/diagnosis`` ran ``pages/diagnosis.py`` straight from the folder, without
    app.py and its sign-in, under a raw list of the folder's file names.
    (Streamlit's AppTest starts every run in that mode.)"""
    if not getattr(PagesManager, "uses_pages_directory", False):
        return False
    PagesManager.uses_pages_directory = False
    return True


def guard_page() -> None:
    """First call of every page script: with sign-in on, a page runs only through
    app.py's navigation (its sign-in page, the pages the user's role allows) and
    only for a signed-in user with a usable role. Without sign-in a page run
    straight from ``pages/`` goes on: the one local user may see every page."""
    legacy = legacy_pages_run()
    if not sign_in_enabled():
        return
    if legacy:
        st.rerun()  # the run starts again from app.py
    try:
        user = current_user()
    except ValueError:  # app.py says why
        user = None
    if user is None:
        st.stop()


def user_identity() -> str:
    """What the audit log records as the user: '' when sign-in is off."""
    user = current_user()
    return user.identity if user else ""


def is_admin() -> bool:
    """Whether this session may evaluate folders and read the audit log: a
    signed-in admin, or the one local user when sign-in is off."""
    if not sign_in_enabled():
        return True
    user = current_user()
    return bool(user and user.is_admin)


def record_evaluation(report_path: str | Path, report: dict) -> None:
    """Index a folder evaluation's report under the signed-in user."""
    audit_log().add_report(user=user_identity(), model=str(report.get("model", "")),
                           model_version=str(report.get("model_version", "")), report=Path(report_path).name,
                           evaluated_on=str(report.get("evaluated_on", "")), images=int(report.get("images", 0)),
                           accuracy=report.get("accuracy"), macro_f1=report.get("macro_f1"))


# --------------------------------------------------------------------------- series and volumes (issue 9)

from .series import SeriesPredictions  # noqa: E402
from .series_background import BackgroundClassification  # noqa: E402
from .series_figures import thumbnails as _thumbnails  # noqa: E402
from .series_inputs import read_inputs  # noqa: E402
from .volumes import ReadResult, Series  # noqa: E402

MAX_READ_SERIES = 3  # reads held at once: a 300-slice CT series is ~150 MB of int16 Hounsfield units


@st.cache_resource(max_entries=MAX_READ_SERIES, ttl=TTL, show_spinner=False)
def _read_series(key: str, _inputs: tuple) -> ReadResult:
    return read_inputs(list(_inputs))


def read_series(inputs: list) -> ReadResult:
    """Series, volumes and loose images of uploaded files (a list of
    :class:`~ctapp.series.Input`), read once per distinct upload and shared
    (read-only) by the sessions that upload the same files. A read that found
    nothing but errors is not kept: the user fixes the cause (a PACS, the
    server's memory) and asks again, and is answered by a new read, not by the
    failure. A read that found something is kept with its per-file errors, so
    that a stray file does not make every rerun read the whole upload again."""
    import hashlib

    digest = hashlib.sha256()
    for item in inputs:
        digest.update(item.name.encode("utf-8", "replace") + b"\0" + hashlib.sha256(item.data).digest())
    key, held = digest.hexdigest(), tuple(inputs)
    result = _read_series(key, held)
    if result.errors and not (result.series or result.images):
        _read_series.clear(key, held)
    return result


@st.cache_resource(max_entries=8, ttl=TTL, show_spinner=False)
def _series_classification(path: str, weights_stamp: float, digest: str, _series: Series) -> BackgroundClassification:
    return BackgroundClassification(_load_model(path, weights_stamp), _series)


def series_classification(path: str | Path, series: Series) -> BackgroundClassification:
    """The classification of a series by the model in ``path``, started in the
    background on first request and shared by every session that asks for the
    same series and model (the first chunk's slices are answered first). A
    failed run is handed out once more and dropped, so that asking again starts
    a new run; the page's own rerun when a run ends is that once more."""
    path = Path(path).resolve()
    arguments = (str(path), model_stamp(path), series.digest, series)
    job = _series_classification(*arguments)
    if job.failed:
        _series_classification.clear(*arguments)
    return job


def classify_series(path: str | Path, series: Series, on_progress=None) -> SeriesPredictions:
    """Per-slice predictions of a series by the model in ``path`` (batched, no
    Grad-CAM), computed once per series and model; waits for them, calling
    ``on_progress(slices done, slices)`` meanwhile."""
    return series_classification(path, series).wait(on_progress)


@st.cache_data(max_entries=MAX_ANALYSES, ttl=TTL, show_spinner=False)
def _analyse_series_slice(path: str, weights_stamp: float, digest: str, index: int, method: str,
                          _image) -> Analysis:
    return _load_model(path, weights_stamp).analyse(_image, method=method)


def analyse_series_slice(path: str | Path, series: Series, index: int, image, method: str = "Grad-CAM") -> Analysis:
    """Prediction and Grad-CAM of slice ``index`` of a series (``image``: the
    slice as the model reads it), computed when the slice is viewed."""
    path = Path(path).resolve()
    return _analyse_series_slice(str(path), model_stamp(path), series.digest, index, method, image)


@st.cache_data(max_entries=8, ttl=TTL, show_spinner=False)
def _series_thumbnails(digest: str, _series: Series) -> list[str]:
    return _thumbnails(_series)


def series_thumbnails(series: Series) -> list[str]:
    """Small PNG data URIs of every slice (lung window), for the slice table."""
    return _series_thumbnails(series.digest, series)
