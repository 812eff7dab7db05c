"""Classifying a series in a background thread, a chunk of slices at a time,
so that a page shows the first slices' answers while the rest are classified
and stays responsive meanwhile (scrolling, windowing, the Grad-CAM of the
slice on screen).

Each chunk goes through :func:`ctapp.series.classify_series` as a series of
its own (answers do not depend on the other slices, so the result is the same
as one pass over the whole series); the first chunk is small so that answers
appear within seconds, the later ones large enough to keep batches full.
Progress is counted in slices, whatever the number of ensemble members.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator

from .series import SeriesPredictions, classify_series
from .volumes import Series

log = logging.getLogger(__name__)

FIRST_CHUNK = 8  # slices answered before anything else: shown within seconds
CHUNK = 32  # later chunks: the batch size of classify_series


def chunk_bounds(n: int, first: int = FIRST_CHUNK, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """(start, stop) of the chunks of ``n`` slices: one of ``first``, then of ``size``."""
    start, step = 0, max(1, first)
    while start < n:
        stop = min(n, start + step)
        yield start, stop
        start, step = stop, max(1, size)


def series_part(series: Series, start: int, stop: int) -> Series:
    """Slices ``start``..``stop - 1`` of ``series`` as a series of their own
    (a view of the same values, no copy)."""
    return dataclasses.replace(
        series, values=series.values[start:stop], sources=series.sources[start:stop],
        positions=series.positions[start:stop], slice_notes=series.slice_notes[start:stop], reference=None,
        digest=f"{series.digest}[{start}:{stop}]")


class BackgroundClassification:
    """One series through one model, started at once in a daemon thread.
    Every method may be called from any thread while it runs."""

    def __init__(self, model, series: Series, *, first: int = FIRST_CHUNK, size: int = CHUNK):
        self.total = len(series)
        self._empty = SeriesPredictions.of_model(model, [])
        self._predictions: list = []
        self._slices_done = 0.0
        self._result: SeriesPredictions | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(model, series, first, size), daemon=True,
                                        name=f"classify {series.id}")
        self._thread.start()

    def _run(self, model, series: Series, first: int, size: int) -> None:
        started = time.perf_counter()
        try:
            for start, stop in chunk_bounds(self.total, first, size):
                def advance(done: int, total: int, start: int = start, stop: int = stop) -> None:
                    with self._lock:
                        self._slices_done = start + (stop - start) * done / max(total, 1)

                part = classify_series(model, series_part(series, start, stop), on_progress=advance)
                with self._lock:
                    self._predictions.extend(part.predictions)
                    self._slices_done = float(stop)
            self._result = dataclasses.replace(self._empty, predictions=list(self._predictions),
                                               seconds=time.perf_counter() - started)
        except BaseException as error:  # kept for whoever waits: a page must say so, not hang
            log.exception("classifying series %s failed", series.id)
            self._error = error
        finally:
            self._finished.set()

    @property
    def finished(self) -> bool:
        """Whether every slice is classified (or the run failed)."""
        return self._finished.is_set()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def slices_done(self) -> int:
        """Slices classified so far, counting the chunk under way by its batches."""
        with self._lock:
            return int(self._slices_done)

    def snapshot(self) -> SeriesPredictions:
        """The predictions of the slices classified so far (the first ones, in
        reading order); once finished, the whole result, the same object each time."""
        if self._result is not None:
            return self._result
        with self._lock:
            return dataclasses.replace(self._empty, predictions=list(self._predictions))

    def wait(self, on_progress: Callable[[int, int], None] | None = None, poll: float = 0.1) -> SeriesPredictions:
        """The whole result once it is there, calling ``on_progress(slices done,
        slices)`` meanwhile; re-raises the run's error."""
        while not self._finished.wait(poll):
            if on_progress:
                on_progress(self.slices_done(), self.total)
        if self._error is not None:
            raise RuntimeError(f"classifying the series failed ({type(self._error).__name__})") from self._error
        if on_progress:
            on_progress(self.total, self.total)
        return self._result
