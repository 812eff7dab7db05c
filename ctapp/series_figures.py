"""Figures of the reading view, as plain functions (no Streamlit): the slice
with its Grad-CAM overlay and colour bar (zoom and pan are plotly's own), the
per-slice class probabilities along a series, display windows and
thumbnails."""
from __future__ import annotations

import cv2
import numpy as np
import plotly.graph_objects as go

from .figures import FONT, GRID, MUTED, PALETTE, cam_overlay
from .imaging import LUNG_WINDOW, MEDIASTINUM_WINDOW, Window
from .inference import CONFIDENT
from .report import png_data_uri
from .series import SeriesPredictions
from .volumes import Series

# Display windows (centre, width in HU) of chest CT reading.
WINDOW_PRESETS = {"Lung": LUNG_WINDOW, "Mediastinum": MEDIASTINUM_WINDOW, "Bone": Window(400.0, 1800.0)}
THUMBNAIL_SIDE = 40
CAM_COLORSCALE = "Jet"  # the colours of cv2.COLORMAP_JET, which cam_overlay draws


def adjust(pixels: np.ndarray, contrast: float = 1.0, brightness: float = 0.0) -> np.ndarray:
    """Grey in [0, 1] with contrast (about mid-grey) and brightness applied:
    the display controls of a PNG/JPEG slice (they have no Hounsfield units)."""
    return np.clip((pixels.astype(np.float32) - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)


def slice_figure(grey: np.ndarray, cam: np.ndarray | None = None, *, opacity: float = 0.4, height: int = 640,
                 revision: str = "") -> go.Figure:
    """The slice (grey in [0, 1]) as an image plotly can zoom and pan, with the
    class-activation map blended in and its colour bar when ``cam`` is given.
    ``revision`` keeps zoom and pan while it stays the same (scrolling a series)."""
    h, w = grey.shape
    picture = cam_overlay(grey, cam, opacity) if cam is not None else np.round(np.clip(grey, 0, 1) * 255).astype(
        np.uint8)
    fig = go.Figure(go.Image(source=png_data_uri(picture), x0=0, y0=0, dx=1, dy=1, hoverinfo="skip"))
    if cam is not None:
        # An invisible point carries the colour bar of the overlay's colour map.
        fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", hoverinfo="skip", showlegend=False,
                                 marker={"size": 0.1, "opacity": 0, "color": [0.0], "cmin": 0.0, "cmax": 1.0,
                                         "colorscale": CAM_COLORSCALE, "showscale": True,
                                         "colorbar": {"title": {"text": "Grad-CAM", "side": "right"},
                                                      "tickvals": [0, 1], "ticktext": ["low", "high"],
                                                      "thickness": 12, "len": 0.6}}))
    fig.update_xaxes(visible=False, range=[-0.5, w - 0.5], constrain="domain")
    fig.update_yaxes(visible=False, range=[h - 0.5, -0.5], scaleanchor="x", constrain="domain")
    fig.update_layout(height=height, margin={"l": 0, "r": 0, "t": 0, "b": 0}, dragmode="pan",
                      plot_bgcolor="black", paper_bgcolor="white", uirevision=revision or None, font=FONT)
    return fig


def probability_profile(result: SeriesPredictions, *, current: int | None = None, height: int = 320) -> go.Figure:
    """Calibrated probability of each class along the series (x: slice number,
    1 = most superior); uncertain slices are marked with grey crosses at the
    top, the current slice with a vertical line. Clicking a point selects it."""
    probs = result.probabilities
    n = len(result.predictions)
    x = np.arange(1, n + 1)
    fig = go.Figure()
    for k, name in enumerate(result.display_names):
        fig.add_trace(go.Scatter(x=x, y=probs[:, k], mode="lines+markers", name=name,
                                 line={"color": PALETTE[k % len(PALETTE)], "width": 2}, marker={"size": 5},
                                 hovertemplate=f"slice %{{x}}<br>{name} %{{y:.0%}}<extra></extra>"))
    flagged = [i for i, p in enumerate(result.predictions) if p.state != CONFIDENT]
    if flagged:
        fig.add_trace(go.Scatter(
            x=x[flagged], y=[1.04] * len(flagged), mode="markers", name="uncertain (no result)",
            marker={"symbol": "x-thin", "size": 9, "color": MUTED, "line": {"width": 2, "color": "#7f8c8d"}},
            customdata=[result.predictions[i].state for i in flagged],
            hovertemplate="slice %{x}: %{customdata}<extra></extra>"))
    if current is not None:
        fig.add_vline(x=current + 1, line={"color": "#1b2631", "width": 1, "dash": "dot"})
    fig.update_xaxes(title="slice (1 = most superior)", range=[0.5, n + 0.5], gridcolor=GRID)
    fig.update_yaxes(title="calibrated probability", range=[0, 1.08], tickformat=".0%", gridcolor=GRID)
    fig.update_layout(height=height, template="plotly_white", font=FONT, clickmode="event+select",
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, hovermode="closest",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0})
    return fig


def selected_slice(event, n: int) -> int | None:
    """The 0-based slice of the first point selected in the probability
    profile (a plotly selection event or its dict), None when none is."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        points = getattr(getattr(event, "selection", None), "points", None)
    if not points:
        return None
    x = points[0].get("x") if isinstance(points[0], dict) else None
    if x is None:
        return None
    index = int(round(float(x))) - 1
    return index if 0 <= index < n else None


def thumbnail(grey: np.ndarray, side: int = THUMBNAIL_SIDE) -> str:
    """A small PNG data URI of a slice for tables."""
    h, w = grey.shape
    scale = side / max(h, w)
    small = cv2.resize(np.clip(grey, 0, 1).astype(np.float32), (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    return png_data_uri(small)


def thumbnails(series: Series, window: Window = LUNG_WINDOW) -> list[str]:
    return [thumbnail(series.slice(i, window).pixels) for i in range(len(series))]
