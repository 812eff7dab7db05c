"""AppTest of the series viewer: a zip of two series, loose DICOM and PNG
files, the slice slider and previous/next, the z-profile, the slice table,
the downloads (CSV, HTML report, DICOM SR read back with highdicom), the
hand-over from the diagnosis page, and no patient identifier on the page."""
# ruff: noqa: F811  (pytest fixtures imported from app_fixtures are "redefined" as test arguments)
from __future__ import annotations

import base64
import io
import json
import re
import time

import numpy as np
from app_fixtures import TASK, app_env, app_settings  # noqa: F401
from series_synthetic import dicom_series, grey_volume, nifti_bytes, shuffled_names, zip_bytes
from streamlit.testing.v1 import AppTest
from test_app import all_text, choose_tiny_task, plain, run, start
from test_series import IDENTIFIERS, _png

VIEWER = "pages/viewer.py"


def viewer() -> AppTest:
    return choose_tiny_task(start(VIEWER), "viewer_task")


def classified(at: AppTest, timeout: float = 90.0) -> AppTest:
    """The page once the series on screen is classified: it is classified in the background, so the page is
    run again until its progress bar is gone."""
    deadline = time.monotonic() + timeout
    while at.get("progress") and time.monotonic() < deadline:
        time.sleep(0.2)
        at = run(at)
    assert not at.get("progress"), "the series was not classified in time"
    return at


def charts(at: AppTest) -> dict[str, dict]:
    """Plotly charts of the page by key, as their figure JSON."""
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[chart.proto.id.split("-")[-1] if not chart.key else chart.key] = spec
    return out


def values(array) -> list:
    """A plotly JSON array (a list, or typed binary data)."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def profile(at: AppTest) -> dict:
    return next(spec for key, spec in charts(at).items() if "viewer_profile" in key)


def slider(at: AppTest):
    return next(s for s in at.slider if s.key and s.key.startswith("viewer_slice_"))


def test_zip_of_two_series_opens_in_the_viewer(app_settings):
    at = viewer()
    a, b = grey_volume(6, 48, seed=30), grey_volume(4, 40, seed=31)
    rng = np.random.default_rng(32)
    members = {**shuffled_names(dicom_series(a), rng, "export/"),
               **shuffled_names(dicom_series(b, orientation="columns-flipped"), rng, "export/")}
    at = classified(run(at.file_uploader(key="viewer_files").set_value(("study.zip", zip_bytes(members),
                                                                         "application/zip"))))
    box = at.selectbox(key="viewer_series")
    assert len(box.options) == 2 and all(o.startswith("S-") for o in box.options)
    assert "6 axial slices, 48x48 px" in box.options[0] and "4 axial slices, 40x40 px" in box.options[1]
    text = all_text(at)
    assert "How the series verdict is reached" in text and "Uncertain (no result)" in text
    # the tiny models never saw DICOM-windowed slices: every slice is uncertain, so no result
    assert "No result: only 0 of 6 slices were answered confidently" in text

    z = profile(at)
    class_traces = [t for t in z["data"] if t.get("mode") == "lines+markers"]
    assert [t["name"] for t in class_traces] == ["Alpha", "Beta"]
    assert all(values(t["x"]) == [1, 2, 3, 4, 5, 6] for t in class_traces)
    flagged = [t for t in z["data"] if t.get("name") == "uncertain (no result)"]
    assert len(flagged) == 1 and values(flagged[0]["x"]) == [1, 2, 3, 4, 5, 6]

    assert slider(at).value == 1 and slider(at).max == 6
    at = run(slider(at).set_value(4))
    assert "Slice 4 of 6:" in all_text(at)
    at = run(next(b for b in at.button if b.key and b.key.startswith("viewer_next_")).click())
    assert slider(at).value == 5 and "Slice 5 of 6:" in all_text(at)
    at = run(next(b for b in at.button if b.key and b.key.startswith("viewer_prev_")).click())
    assert slider(at).value == 4
    assert any(shape.get("x0") == 4 for shape in profile(at)["layout"].get("shapes", []))  # current slice marked

    table = next(frame.value for frame in at.dataframe if "Thumbnail" in frame.value.columns)
    assert list(table["Slice"]) == [1, 2, 3, 4, 5, 6]
    assert table["Name"][0].endswith("/ slice 1 of 6") and table["Thumbnail"][0].startswith("data:image/png;base64,")
    at = classified(run(at.selectbox(key="viewer_series").set_value(1)))
    assert slider(at).max == 4
    text = all_text(at)
    for identifier in IDENTIFIERS:
        assert identifier not in text


def test_loose_files_and_a_volume_in_one_upload(app_settings):
    at = viewer()
    grey = grey_volume(3, 48, seed=33)
    files = [(name, data, "application/octet-stream")
             for name, data in shuffled_names(dicom_series(grey), np.random.default_rng(34)).items()]
    files += [("scans/a.png", _png(grey[0]), "image/png"), ("scans/b.png", _png(grey[1]), "image/png"),
              ("vol.nii.gz", nifti_bytes(grey), "application/gzip"), ("notes.txt", b"not an image", "text/plain")]
    at = classified(run(at.file_uploader(key="viewer_files").set_value(files)))
    assert any("notes.txt" in plain(e.value) and "not an image" in plain(e.value) for e in at.error)
    options = at.selectbox(key="viewer_series").options
    assert len(options) == 3 and options[2].startswith("Loose slices · 2 loose slices")
    at = classified(run(at.selectbox(key="viewer_series").set_value(2)))
    table = next(frame.value for frame in at.dataframe if "Thumbnail" in frame.value.columns)
    assert list(table["Name"]) == ["scans/a.png", "scans/b.png"]
    for result, confidence in zip(table["Result"], table["Confidence"]):  # a bar only for a confident answer
        assert (0.0 < confidence <= 1.0) if result in ("Alpha", "Beta") else confidence is None, (result, confidence)
    assert at.slider(key="viewer_contrast").value == 1.0  # PNG stacks: contrast and brightness, no HU window
    assert not [r for r in at.radio if r.key == "viewer_window"]
    # The PNG slices are chest-CT-like for the tiny model: its Grad-CAM overlay and colour bar show.
    image = charts(at)["viewer_image"]
    assert image["data"][0]["type"] == "image"
    assert any(t.get("marker", {}).get("showscale") for t in image["data"][1:]) or \
        "not a chest CT" in all_text(at)


def test_downloads_csv_report_and_a_structured_report_that_reads_back(app_settings, tiny_model):
    """The download buttons' content, built by the page's own functions on the
    series the page shows."""
    import highdicom as hd
    import pydicom

    from ctapp.model_folders import load_model
    from ctapp.series import classify_series
    from ctapp.series_inputs import read_inputs
    from ctapp.volumes import Input
    from pages.viewer import build_report, build_sr, series_csv

    at = viewer()
    grey = grey_volume(4, 48, seed=35)
    files = dicom_series(grey)
    at = classified(run(at.file_uploader(key="viewer_files").set_value(
        [(f"IM{i}", f, "application/octet-stream") for i, f in enumerate(files)])))
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Series CSV", "Series report (HTML)", "DICOM Structured Report"]

    model = load_model(tiny_model)
    (series,) = read_inputs([Input(f"IM{i}", f) for i, f in enumerate(files)]).series
    result = classify_series(model, series)
    csv_text = series_csv(series, result)
    assert csv_text.splitlines()[0] == "series,slice,name,position_mm,result,state,confidence,p_alpha,p_beta"
    assert len(csv_text.splitlines()) == 5
    page = build_report(model, series, result)
    assert "CT series classification report" in page and series.id in page and "Rule." in page
    assert "Research use only" in page
    data = build_sr(model, series, result)
    sr = hd.sr.srread(io.BytesIO(data))
    dataset = pydicom.dcmread(io.BytesIO(data))
    evidence = dataset.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == series.reference.study_uid
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.reference.series_uid
    assert len(referenced.ReferencedSOPSequence) == 4
    group = sr.content.get_image_measurement_groups()[0]
    assert group.get_qualitative_evaluations()[0].value.value == "NO_RESULT"
    assert [m.value for m in group.get_measurements()] == [0, 0, 4]
    for text in (csv_text, page, data.decode("latin-1")):
        for identifier in IDENTIFIERS:
            assert identifier not in text


def test_diagnosis_hands_a_series_over_to_the_viewer(app_settings):
    at = choose_tiny_task(start(), "task")
    grey = grey_volume(3, 48, seed=36)
    archive = zip_bytes({f"IM{i}": f for i, f in enumerate(dicom_series(grey))})
    at = run(at.file_uploader(key="uploads").set_value(("study.zip", archive, "application/zip")))
    assert "series" in all_text(at).lower()
    at = run(at.button(key="open_in_viewer").click())
    assert not at.exception
    at = classified(choose_tiny_task(at, "viewer_task"))
    assert at.selectbox(key="viewer_series").options[0].startswith("S-")
    assert slider(at).max == 3


def test_comparison_widgets_follow_the_task(app_settings, monkeypatch, tmp_path):
    """After switching Task, Model A/B and Image to explain offer only that
    task's reports (their widget state is keyed by the task)."""
    from app_fixtures import copy_model, flip_predictions

    other = tmp_path / "other"
    for name in ("other-x", "other-y"):
        folder = copy_model(app_settings.model_a, other / name, name)
        card = json.loads((folder / "model_card.json").read_text())
        card["task"] = "Other task"
        (folder / "model_card.json").write_text(json.dumps(card))
    flip_predictions(other / "other-y")
    import os

    monkeypatch.setenv("CTAPP_MODELS_DIR", os.pathsep.join([str(app_settings.models_dir), str(other)]))
    at = choose_tiny_task(start("pages/compare.py"), "compare_task")
    a = at.selectbox(key=f"pair_a_{TASK}")
    assert a.options == ["tiny-a · validation split", "tiny-b · validation split"]
    at = run(a.set_value(1))
    at = run(at.selectbox(key="compare_task").set_value("Other task"))
    a, b = at.selectbox(key="pair_a_Other task"), at.selectbox(key="pair_b_Other task")
    assert a.options == b.options == ["other-x · validation split", "other-y · validation split"]
    assert (a.value, b.value) == (0, 1)  # this task's defaults, not the other task's choice
    pick = next(s for s in at.selectbox if s.key and s.key.startswith("disagreement_pick_Other task"))
    assert pick.options  # the images these two models disagree on
    assert not [s for s in at.selectbox if s.key and s.key.startswith("pair_a_" + TASK)]
    at = run(at.selectbox(key="compare_task").set_value(TASK))
    assert at.selectbox(key=f"pair_a_{TASK}").options[0] == "tiny-a · validation split"


# --------------------------------------------------------------------------- background classification and audit


def series_records(app_settings) -> list[dict]:
    from ctapp.store import Store

    store = Store(app_settings.audit_log)
    try:
        return [r for r in store.diagnoses(limit=10**6) if r["series_id"]]
    finally:
        store.close()


def test_every_series_classified_in_the_viewer_leaves_one_audit_record_with_its_state(app_settings):
    """The issue's case: a 6-slice DICOM series and 5 PNG slices. Each stack the viewer classifies is one record
    (series id, slice count, state apart from the class, hash of its pixels), once per session."""
    before = {r["id"] for r in series_records(app_settings)}
    grey = grey_volume(6, 48, seed=50)
    files = [(f"IM{i}", f, "application/octet-stream") for i, f in enumerate(dicom_series(grey))]
    files += [(f"p{i}.png", _png(g), "image/png") for i, g in enumerate(grey_volume(5, 48, seed=51))]
    at = classified(run(viewer().file_uploader(key="viewer_files").set_value(files)))
    options = at.selectbox(key="viewer_series").options
    dicom_id = options[0].split(" · ")[0]
    new = [r for r in series_records(app_settings) if r["id"] not in before]
    assert len(new) == 1
    (row,) = new
    assert (row["series_id"], row["slices"], row["model"], row["username"]) == (dicom_id, 6, "tiny-a", "")
    # the tiny models never saw DICOM-windowed slices: none of the six is answered, so the series has no result
    assert row["state"] == "no result"
    counts = [re.fullmatch(r"(low confidence|unlike the training images|not a chest CT): (\d) of 6 slices", flag)
              for flag in json.loads(row["flags"])]
    assert all(counts) and sum(int(m[2]) for m in counts) == 6
    assert row["prediction"] in ("alpha", "beta") and row["confidence"] == 0.0
    assert len(row["image_sha256"]) == 64 and dicom_id not in row["image_sha256"]

    at = classified(run(at.selectbox(key="viewer_series").set_value(1)))
    new = [r for r in series_records(app_settings) if r["id"] not in before]
    assert [(r["slices"], r["series_id"].startswith("images-")) for r in new] == [(5, True), (6, False)]
    loose = new[0]
    table = next(frame.value for frame in at.dataframe if "Thumbnail" in frame.value.columns)
    confident = {name: list(table["Result"]).count(name) for name in ("Alpha", "Beta")}
    assert json.loads(loose["probabilities"]) == {"alpha": confident["Alpha"] / 5, "beta": confident["Beta"] / 5}
    run(at.selectbox(key="viewer_series").set_value(0))  # seen again in this session: no second record
    assert len([r for r in series_records(app_settings) if r["id"] not in before]) == 2


def test_uncertain_slices_show_their_state_and_no_confidence_bar(app_settings):
    at = viewer()
    grey = grey_volume(4, 48, seed=52)
    files = [(f"IM{i}", f, "application/octet-stream") for i, f in enumerate(dicom_series(grey))]
    at = classified(run(at.file_uploader(key="viewer_files").set_value(files)))
    frame = next(frame for frame in at.dataframe if "Thumbnail" in frame.value.columns)
    assert all(re.fullmatch(r"Not a chest CT \(no result\)|(Uncertain|Unlike the training images) \(leans "
                            r"(Alpha|Beta)\)", result) for result in frame.value["Result"]), list(frame.value["Result"])
    assert frame.value["Confidence"].isna().all()  # the progress column draws no bar for an empty cell
    assert json.loads(frame.proto.columns)["Confidence"]["type_config"]["type"] == "progress"


class Gate:
    """classify_series that answers each chunk only when the test lets it: what the page shows between chunks."""

    def __init__(self, monkeypatch):
        import threading

        from ctapp import series_background

        self.real, self.chunks, self.allowed = series_background.classify_series, [], threading.Semaphore(0)
        monkeypatch.setattr(series_background, "classify_series", self)

    def __call__(self, model, part, **kwargs):
        assert self.allowed.acquire(timeout=60), "the test never let this chunk through"
        result = self.real(model, part, **kwargs)
        self.chunks.append(len(part))
        return result

    def wait_for(self, chunks: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.chunks) < chunks and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the chunk's answers are stored just after it returns


def test_the_viewer_shows_the_first_slices_while_the_rest_are_classified(app_settings, monkeypatch):
    gate = Gate(monkeypatch)
    grey = grey_volume(12, 32, seed=53)
    files = [(f"p{i:02d}.png", _png(g), "image/png") for i, g in enumerate(grey)]
    gate.allowed.release()  # the first chunk only
    at = run(viewer().file_uploader(key="viewer_files").set_value(files))
    gate.wait_for(1)
    at = run(at)
    assert gate.chunks == [8]
    (bar,) = at.get("progress")
    assert "Classifying in the background: 8 of 12 slices" in bar.proto.text
    table = next(frame.value for frame in at.dataframe if "Thumbnail" in frame.value.columns)
    assert list(table["Slice"]) == list(range(1, 9))
    assert slider(at).max == 12 and "Slice 1 of 12:" in all_text(at)
    assert "How the series verdict is reached" not in all_text(at)  # no verdict before every slice is answered
    assert not at.get("download_button")
    at = run(slider(at).set_value(10))
    assert "**Slice 10 of 12:** not classified yet (8 of 12 are)." in all_text(at)
    assert "viewer_probs" not in charts(at)
    gate.allowed.release()
    at = classified(at)
    assert gate.chunks == [8, 4]
    table = next(frame.value for frame in at.dataframe if "Thumbnail" in frame.value.columns)
    assert list(table["Slice"]) == list(range(1, 13))
    assert "How the series verdict is reached" in all_text(at) and "Slice 10 of 12:" in all_text(at)
    assert [b.label for b in at.get("download_button")][:2] == ["Series CSV", "Series report (HTML)"]


def test_a_background_classification_answers_as_one_pass_and_counts_progress_in_slices(tmp_path):
    """Chunk by chunk, an ensemble's answers equal one pass over the whole series, and its progress counts
    slices (the progress line said 80 slices for a 40-slice series: each member's pass counted)."""
    from tiny_models import write_model_folder

    from ctapp.model_folders import ENSEMBLE_FILE, load_model
    from ctapp.series import classify_series
    from ctapp.series_background import BackgroundClassification, chunk_bounds
    from ctapp.series_inputs import images_series, read_inputs
    from ctapp.volumes import Input

    assert list(chunk_bounds(45)) == [(0, 8), (8, 40), (40, 45)] and list(chunk_bounds(0)) == []
    for seed, name in enumerate("ab"):
        write_model_folder(tmp_path / name, seed=seed)
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / ENSEMBLE_FILE).write_text(json.dumps({"members": ["../a", "../b"]}))
    ensemble = load_model(tmp_path / "ab")
    grey = grey_volume(7, 32, seed=54)
    series = images_series(read_inputs([Input(f"{i}.png", _png(g)) for i, g in enumerate(grey)]).images)
    seen = []
    job = BackgroundClassification(ensemble, series, first=3, size=2)
    result = job.wait(lambda done, total: seen.append((done, total)))
    assert seen[-1] == (7, 7) and all(total == 7 and 0 <= done <= 7 for done, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    whole = classify_series(ensemble, series)
    assert [p.state for p in result.predictions] == [p.state for p in whole.predictions]
    assert np.allclose(result.probabilities, whole.probabilities, atol=1e-6)
    assert job.snapshot() is result and job.finished and not job.failed and job.slices_done() == 7


def test_a_series_that_reaches_no_finding_class_is_shown_neutral_never_as_a_success(app_settings, monkeypatch):
    """Four of six slices answered, none of their classes on three: 'no finding
    class reached' is said in a neutral box, with how many slices were answered."""
    from ctapp import series_background
    from ctapp.inference import CONFIDENT, LOW_CONFIDENCE
    from test_series import _predictions

    def answers(model, part, **_kwargs):
        a, b = model.class_names
        pattern = [(CONFIDENT, a), (CONFIDENT, b)] * 2 + [(LOW_CONFIDENCE, a), (LOW_CONFIDENCE, b)]
        return _predictions(pattern[:len(part)], tuple(model.class_names), tuple(model.display_names))

    monkeypatch.setattr(series_background, "classify_series", answers)
    slices = dicom_series(grey_volume(6, 48, seed=53))
    files = [(f"IM{i}", f, "application/octet-stream") for i, f in enumerate(slices)]
    at = classified(run(viewer().file_uploader(key="viewer_files").set_value(files)))
    assert not at.success
    (shown,) = [box.value for box in at.info if "No finding class reached" in box.value]
    assert "4 of 6 slices answered confidently" in shown and "not a negative result" in shown
