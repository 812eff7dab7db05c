"""Reviewed snapshots: :func:`check` compares text or JSON-like data with its file
under ``tests/golden/snapshots/`` (numbers to a relative 1e-9, embedded PNGs by
their pixels); ``CTAPP_UPDATE_SNAPSHOTS=1`` rewrites the files for review."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re

import numpy as np
import plotly.io
import pytest
from conftest import ROOT
from PIL import Image

SNAPSHOTS = ROOT / "tests" / "golden" / "snapshots"
UPDATE = bool(os.environ.get("CTAPP_UPDATE_SNAPSHOTS"))
PNG_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _png_summary(match: re.Match) -> str:
    image = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    pixels = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16]
    return f"<png {image.width}x{image.height} {image.mode} pixels {pixels}>"


def plain_data(value):
    """JSON-like data with every embedded PNG replaced by a summary of its pixels."""
    if isinstance(value, str):
        return PNG_URI.sub(_png_summary, value)
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    return value


def figure_data(fig) -> dict:
    data = json.loads(plotly.io.to_json(fig, validate=False, remove_uids=True))
    data["layout"].pop("template", None)  # plotly's own theme, not this project's choices
    return plain_data(data)


def _assert_same(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), (where, list(actual), list(expected))
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (where, actual, expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool):
        assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12), where
    else:
        assert actual == expected, where


def check(name: str, value) -> None:
    """``value`` (text or JSON-like data) against its snapshot."""
    value = plain_data(value)
    text = isinstance(value, str)
    path = SNAPSHOTS / (name + (".txt" if text else ".json"))
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value if text else json.dumps(value, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    assert path.is_file(), f"no snapshot {path.name}: run with CTAPP_UPDATE_SNAPSHOTS=1 and review it"
    hint = f"{name} changed; if on purpose, rerun with CTAPP_UPDATE_SNAPSHOTS=1 and review the diff"
    if text:
        assert value.split() == path.read_text(encoding="utf-8").split(), hint  # line wrapping aside
    else:
        try:
            _assert_same(value, json.loads(path.read_text(encoding="utf-8")))
        except AssertionError as exc:
            raise AssertionError(f"{hint}: {exc}") from None
