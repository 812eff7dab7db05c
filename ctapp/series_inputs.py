"""Named files (uploads, files of a folder, members of a zip) sorted into
series, volumes and loose images, within the limits of one read
(:class:`ctapp.volumes.Limits`)."""
from __future__ import annotations

import io
import logging
import re
import threading
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from . import imaging
from .imaging import ImageDecodeError, Slice, Window, decode, is_dicom
from .volume_formats import (
    DicomFrame,
    build_dicom_series,
    dicom_frames,
    frame_count,
    is_gzip,
    nifti_stream,
    nifti_version,
    read_dicom_header,
    read_nifti,
)
from .volumes import (
    DEFAULT_LIMITS,
    Input,
    Limits,
    ReadBudget,
    ReadError,
    ReadResult,
    Series,
    SeriesError,
    megabytes,
    series_id_of,
    values_digest,
)

log = logging.getLogger(__name__)


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


@dataclass(frozen=True)
class _Pending:
    """A file waiting to be read: ``load`` gives its bytes (a zip member is
    inflated again each time, so that only the file being read is held)."""

    name: str
    load: Callable[[], bytes] = field(repr=False)
    from_zip: bool
    top: int  # the index of the input it came from
    error: str = ""
    header: object = field(default=None, repr=False)  # a zip member's DICOM header, read as the archive was checked


def _member_loader(item: Input, archive: zipfile.ZipFile, member: zipfile.ZipInfo,
                   lock: threading.Lock) -> Callable[[], bytes]:
    def load() -> bytes:
        try:
            with lock:
                return archive.read(member)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError):
            log.info("zip member unreadable", exc_info=True)
            raise SeriesError(f"{item.name}: the archive is damaged or uses an unsupported compression") from None

    return load


def expand_zip(item: Input, limits: Limits, budget: ReadBudget, top: int) -> list[_Pending]:
    """The members of a zip archive, counted and size-checked by inflating
    each one without keeping it (the sizes its directory claims are not
    trusted): an archive over a limit is refused before any of it is read.
    Folders, hidden files and DICOMDIR are skipped."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(item.data))
    except (zipfile.BadZipFile, OSError, ValueError):
        raise SeriesError(f"{item.name}: the zip archive is damaged or incomplete") from None
    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > limits.max_zip_members:
        raise SeriesError(f"{item.name}: the archive holds {len(members)} files; at most {limits.max_zip_members} "
                          "are read from one archive")
    out, expanded, lock = [], 0, threading.Lock()
    for member in members:
        name = member.filename
        parts = PurePosixPath(name).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts) or PurePosixPath(name).name.upper() == "DICOMDIR":
            continue
        if member.flag_bits & 0x1:
            raise SeriesError(f"{item.name}: the archive is encrypted; export it without a password")
        size, dicom = 0, None  # a DICOM member's bytes are kept while it is inflated, for its header
        try:
            with archive.open(member) as stream:
                while chunk := stream.read(1 << 20):
                    if size == 0 and is_dicom(chunk):
                        dicom = []
                    if dicom is not None:
                        dicom.append(chunk)
                    size += len(chunk)
                    expanded += len(chunk)
                    if expanded > limits.max_expanded_bytes:
                        raise SeriesError(
                            f"{item.name}: the archive expands to more than {megabytes(limits.max_expanded_bytes)} "
                            "(a possible zip bomb); nothing of it was read")
                    if size > imaging.MAX_FILE_BYTES:
                        raise SeriesError(f"{item.name}: member {name} is larger than "
                                          f"{megabytes(imaging.MAX_FILE_BYTES)}")
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError):
            log.info("zip member unreadable", exc_info=True)
            raise SeriesError(f"{item.name}: the archive is damaged or uses an unsupported compression") from None
        budget.take(size, item.name)
        out.append(_member(f"{item.name}:{name}", _member_loader(item, archive, member, lock), top,
                           b"".join(dicom or [])))
    return out


def _member(name: str, load: Callable[[], bytes], top: int, dicom: bytes) -> _Pending:
    """A zip member to read; a DICOM one (``dicom``: its bytes) with its
    header already read, so that it is inflated again only for its pixels."""
    if not dicom:
        return _Pending(name, load, True, top)
    try:
        return _Pending(name, load, True, top, header=read_dicom_header(dicom))
    except ImageDecodeError as exc:
        return _Pending(name, load, True, top, error=f"{name}: {exc}")


def read_inputs(inputs: Iterable[Input], *, limits: Limits = DEFAULT_LIMITS, window: Window | None = None,
                ) -> ReadResult:
    """Sort named files into series, volumes and loose images and read them.

    A file or series that cannot be read is an entry of ``errors``; the rest
    are still read. Every file counts against one budget of bytes read and of
    values held (:class:`ctapp.volumes.ReadBudget`). ``window`` only decodes
    the loose images (as the model will see them); series keep Hounsfield
    units.
    """
    result = ReadResult()
    budget = ReadBudget(limits)
    frames_by_series: dict[str, list[DicomFrame]] = {}
    window = window or Window()
    queue = [_Pending(item.name, lambda item=item: item.data, False, i, item.error) for i, item in enumerate(inputs)]
    top = 0

    def add(kind: str, key: str) -> None:
        result.order.append((kind, key))
        result.origin.setdefault((kind, key), top)

    def fail(name: str, message: str, series: str | None = None) -> None:
        message = re.sub(r"^upload: ", "", message)
        if not message.startswith(series or name):
            message = f"{series or name}: {message}"
        result.errors.append(ReadError(name, message, series))
        add("error", series or name)

    series_origin: dict[str, int] = {}

    def add_frames(frames: list[DicomFrame]) -> None:
        uid = frames[0].series_uid or f"file:{frames[0].source}"
        if uid not in frames_by_series:
            add("series", series_id_of(uid))
            series_origin[uid] = top
        frames_by_series.setdefault(uid, []).extend(frames)

    while queue:
        pending = queue.pop(0)
        top = pending.top
        try:
            if pending.error:
                raise SeriesError(pending.error)
            if pending.header is not None:
                add_frames(dicom_frames(Input(pending.name, b""), pending.header, limits, pending.load))
                continue
            item = Input(pending.name, pending.load())
            if not pending.from_zip:
                budget.take(len(item.data), item.name)
            if not item.data:
                raise SeriesError(f"{item.name}: the file is empty")
            if is_zip(item.data):
                if pending.from_zip:
                    raise SeriesError("an archive inside an archive is not opened; unpack it first")
                members = expand_zip(item, limits, budget, top)
                if not members:
                    raise SeriesError(f"{item.name}: the archive holds no files")
                queue[0:0] = members
                continue
            if len(item.data) > imaging.MAX_FILE_BYTES:
                raise SeriesError(f"{item.name}: the file is {megabytes(len(item.data))}; the limit is "
                                  f"{megabytes(imaging.MAX_FILE_BYTES)}")
            nifti = nifti_stream(item)
            if nifti is not None:
                series = read_nifti(item.name, nifti, limits, budget)
                result.series.append(series)
                add("series", series.id)
                continue
            if is_dicom(item.data):
                try:
                    header = read_dicom_header(item.data)
                except ImageDecodeError as exc:
                    raise SeriesError(f"{item.name}: {exc}") from None
                add_frames(dicom_frames(item, header, limits, pending.load))
                continue
            if len(result.images) >= limits.max_images:
                raise SeriesError(f"more than {limits.max_images} loose images; this one was not read")
            image = decode(item.data, window=window)
            budget.hold(image.pixels.nbytes, item.name)
            result.images.append((item.name, image))
            add("image", item.name)
        except (SeriesError, ImageDecodeError) as exc:
            fail(pending.name, str(exc))
    for uid, frames in frames_by_series.items():
        sid = series_id_of(uid)
        try:
            result.series.append(build_dicom_series(sid, frames, limits, budget))
        except (SeriesError, ImageDecodeError) as exc:
            place = result.order.index(("series", sid))
            top = series_origin[uid]
            fail(frames[0].source, str(exc), sid)
            result.order[place] = result.order.pop()
    return result


def inputs_from_paths(paths: Iterable, limits: Limits = DEFAULT_LIMITS) -> list[Input]:
    """Files as :class:`Input` (named by their path), sizes checked before
    anything is read; a file that cannot be read carries its error."""
    out, total = [], 0
    for path in paths:
        name = str(path)
        try:
            if not path.is_file():
                out.append(Input(name, b"", f"{name}: {'not a file' if path.exists() else 'no such file'}"))
                continue
            size = path.stat().st_size
            total += size
            if total > limits.max_total_bytes:
                out.append(Input(name, b"", f"{name}: the inputs add up to more than "
                                            f"{megabytes(limits.max_total_bytes)}; this file was not read"))
                continue
            if size > max(imaging.MAX_FILE_BYTES, limits.max_expanded_bytes):
                out.append(Input(name, b"", f"{name}: the file is {megabytes(size)}, larger than this app reads"))
                continue
            out.append(Input(name, path.read_bytes()))
        except OSError as exc:
            out.append(Input(name, b"", f"{name}: the file could not be read ({type(exc).__name__})"))
    return out


def holds_series(items: Iterable[tuple[str, bytes]]) -> bool:
    """Whether named uploads hold a series or volume (a zip, a NIfTI volume, a
    multi-frame DICOM, or two DICOM files or more), from their first bytes."""
    dicom = 0
    for _name, data in items:
        if is_zip(data) or nifti_version(data[:540]) is not None:
            return True
        if is_gzip(data) and nifti_stream(Input("", data)) is not None:
            return True
        if is_dicom(data):
            dicom += 1
            if dicom > 1 or frame_count(data) > 1:
                return True
    return False


def images_series(images: list[tuple[str, Slice]]) -> Series | None:
    """The loose images of a read as one stack in input order (grey in [0, 1],
    each at its own size), for the same viewer as a series."""
    if not images:
        return None
    values = [s.pixels for _, s in images]
    series = Series("images-" + values_digest(values)[:8], "images", values, [name for name, _ in images], is_hu=False,
                    positions=[None] * len(values), modality="", slice_notes=[list(s.notes) for _, s in images])
    series.digest = values_digest(values)
    return series
