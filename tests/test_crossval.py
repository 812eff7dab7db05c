"""Cross-validation (issue 8): folds that keep related images together and
cover each image once, calibration fitted only on other folds, the body crop
with Grad-CAM mapped back onto the original pixels, and ``fit --cv`` end to
end, resumed after a kill."""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fork_server import child_env
from PIL import Image
from synthetic import make_slice, write_classes

from ctapp.data import Sample, cv_folds, group_ids, scan_dataset, scan_sources
from ctapp.metrics import fit_temperature, selective_threshold
from ctapp.preprocess import Geometry, PreprocessConfig, body_box, cam_to_image, model_input, to_square
from training.crossval import crossfit_flags

ROOT = Path(__file__).resolve().parent.parent


def samples_named(names: list[str], label: int = 0, source: str = "s") -> list[Sample]:
    return [Sample(Path(f"/data/{source}/c{label}/{n}.png"), label, "", source) for n in names]


def test_blocks_and_figure_groups_never_straddle_folds():
    names = [f"Covid ({i})" for i in range(60)]
    covid = samples_named(names, 0) + samples_named([f"2020.03.{p}-p{i}-1%{j}" for p in range(6)
                                                     for i in range(2) for j in range(3)], 0)
    other = samples_named([f"Non-Covid ({i})" for i in range(60)], 1) + samples_named(
        [f"{fig}%{panel}" for fig in range(20, 32) for panel in range(3)], 1)
    samples = covid + other
    groups = group_ids(samples, block_size=10)
    folds = cv_folds(samples, groups, 4, seed=0, class_names=["covid", "non-covid"])
    assert sorted(np.unique(folds)) == [0, 1, 2, 3]  # every image has exactly one fold
    by_key: dict[tuple, set] = {}
    for s, k in zip(samples, folds):
        stem = s.path.stem
        if "%" in stem or "-p" in stem:
            key = ("figure", stem.split("-p")[0] if "-p" in stem else stem.split("%")[0])
        else:
            key = ("block", s.label, int(stem.split("(")[1].rstrip(")")) // 10)
        by_key.setdefault(key, set()).add(int(k))
    assert len(by_key) == 6 + 6 + 6 + 12
    assert all(len(f) == 1 for f in by_key.values()), by_key
    # Stratified: both classes in every fold.
    for k in range(4):
        assert {s.label for s, f in zip(samples, folds) if f == k} == {0, 1}


def test_identical_images_share_a_fold_even_under_other_names():
    samples = samples_named([f"img{i}" for i in range(40)], 0) + samples_named([f"img{i}" for i in range(40)], 1)
    digests = [f"d{i}" for i in range(80)]
    digests[3] = digests[50] = digests[77] = "same"  # one image under three names, two labels
    groups = group_ids(samples, pattern="", digests=digests)
    assert groups[3] == groups[50] == groups[77]
    assert len(np.unique(groups)) == 78
    folds = cv_folds(samples, groups, 5, seed=1, class_names=["a", "b"])
    assert folds[3] == folds[50] == folds[77]


def test_sources_are_pooled_with_one_class_list(tmp_path):
    write_classes(tmp_path / "one", ["COVID", "non-COVID"], 3, size=24)
    write_classes(tmp_path / "two", ["covid", "Non-COVID"], 2, size=24)
    index = scan_sources([tmp_path / "one", tmp_path / "two"])
    assert index.class_names == ["covid", "non-covid"]
    assert sorted({s.source for s in index.samples}) == ["one", "two"]
    for s in index.samples:
        assert index.class_names[s.label] == s.path.parent.name.lower()
    assert index.root == tmp_path


def test_each_fold_is_calibrated_on_the_other_folds_only():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), labels] += 2.0
    folds = np.repeat(np.arange(3), 100)
    ood = rng.random(300)
    _, _, before = crossfit_flags(logits, labels, ood, folds, target=0.9, quantile=0.95)
    # Fold 0's own logits, made wildly over-confident, must not move fold 0's calibration...
    skewed = logits.copy()
    skewed[folds == 0] *= 25
    probs, _, after = crossfit_flags(skewed, labels, ood, folds, target=0.9, quantile=0.95)
    assert after["per_fold"][0] == before["per_fold"][0]
    # ...which is the temperature fitted on folds 1 and 2, computed here directly.
    rest = folds != 0
    assert after["per_fold"][0]["temperature"] == pytest.approx(fit_temperature(logits[rest], labels[rest]))
    z = skewed[folds == 0] / after["per_fold"][0]["temperature"]
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(probs[folds == 0], expected / expected.sum(1, keepdims=True), rtol=1e-9)
    # ...while folds 1 and 2 see fold 0's change.
    assert after["per_fold"][1]["temperature"] != before["per_fold"][1]["temperature"]


def test_selective_threshold_reaches_the_target_on_the_most_slices():
    # Confidences 0.99, 0.98, ..., 0.50 with ten wrong answers at known ranks.
    confidence = np.linspace(0.99, 0.50, 50)
    correct = np.ones(50, bool)
    correct[[10, 30, 31, 32, 40, 41, 42, 43, 44, 45]] = False
    probs = np.column_stack([confidence, 1 - confidence])
    labels = np.where(correct, 0, 1)
    threshold = selective_threshold(probs, labels, np.zeros(50, bool), target=0.9, min_answered=5)
    # The top 40 (down to rank 39) hold 4 mistakes: 36/40 = 0.90; the top 46 hold 5 (41/46 = 0.89),
    # every larger share is worse: rank 39's confidence is the lowest threshold that reaches 0.9.
    assert threshold == pytest.approx(confidence[39])
    answered = confidence >= threshold
    assert correct[answered].mean() == pytest.approx(0.9) and answered.sum() == 40
    flagged = np.zeros(50, bool)
    flagged[[0, 1]] = True  # flagged slices never count as answered: 34/38 < 0.9 at rank 39, so
    # the cut moves up to rank 31, where the 30 answered (ranks 2-31) hold three mistakes (27/30).
    assert selective_threshold(probs, labels, flagged, 0.9, 5) == pytest.approx(confidence[31])
    # Every slice flagged: nothing to fit on, the threshold is the highest a probability can reach.
    assert selective_threshold(probs, labels, np.ones(50, bool), 0.9, 5) == 1.0


def body_on_canvas() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A 96x96 synthetic slice pasted off-centre on a 200x300 black canvas, with a
    bright 'text' label in the far corner."""
    slice_ = make_slice(0, np.random.default_rng(0), 96).astype(np.float32) / 255
    slice_ = np.where(slice_ > 0.1, np.maximum(slice_, 0.6), 0)  # tissue brighter than air
    canvas = np.zeros((200, 300), np.float32)
    canvas[90:186, 30:126] = slice_
    canvas[5:15, 250:290] = 1.0  # burnt-in text
    ys, xs = np.nonzero(slice_ > 0.1)
    return canvas, (90 + ys.min(), 30 + xs.min(), 90 + ys.max() + 1, 30 + xs.max() + 1)


def test_body_crop_drops_frame_and_text():
    canvas, body = body_on_canvas()
    top, left, bottom, right = body_box(canvas)
    assert top <= body[0] and left <= body[1] and bottom >= body[2] and right >= body[3]
    assert bottom - top <= (body[2] - body[0]) + 8 and right - left <= (body[3] - body[1]) + 8  # margin only
    assert body_box(np.zeros((64, 64), np.float32)) is None  # blank: no body, never a crash
    x, geometry = model_input(np.zeros((64, 64), np.float32), PreprocessConfig(img_size=32, crop="body"))
    assert not geometry.body_found and geometry.box == (0, 0, 64, 64) and x.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("value", [1.0, 0.8])
def test_a_bright_frame_pasted_around_the_slice_is_peeled_before_the_crop(value):
    canvas, _ = body_on_canvas()
    inner = body_box(canvas)
    framed = np.pad(canvas, ((12, 30), (25, 7)), constant_values=value)  # the margins of a paper's figure
    assert body_box(framed) == (inner[0] + 12, inner[1] + 25, inner[2] + 12, inner[3] + 25)
    _, geometry = model_input(framed, PreprocessConfig(img_size=32, crop="body"))
    assert geometry.body_found and geometry.box == body_box(framed)  # no frame pixel reaches the model


def test_peeling_a_frame_stops_at_a_quarter_of_each_side():
    """A slice that is one flat bright field is not peeled to nothing: what is left
    is its middle, a quarter of the height and of the width (rounded down)."""
    from ctapp.preprocess import _inside_frame

    assert _inside_frame(np.full((64, 80), 200, np.uint8), level=100) == (24, 30, 40, 50)
    assert _inside_frame(np.full((64, 80), 90, np.uint8), level=100) == (0, 0, 64, 80)  # dark: not a frame


@pytest.mark.parametrize("ripple, peeled", [(12, True), (13, False)])
def test_a_frame_is_flat_to_within_twelve_grey_levels(ripple, peeled):
    """A pasted margin counts as flat when its pixels stay within 12 grey levels of
    its median (JPEG ringing); with a tenth of them further off it is part of the image."""
    from ctapp.preprocess import _inside_frame

    rows, cols = np.indices((64, 80))
    grey = np.where((rows + cols) % 10 == 0, 200 + ripple, 200).astype(np.uint8)
    grey[4:60, 4:76] = 60
    assert _inside_frame(grey, level=100) == ((4, 4, 60, 76) if peeled else (0, 0, 64, 80))


def test_a_body_cut_in_two_by_a_stitching_line_is_cropped_whole():
    slice_ = make_slice(0, np.random.default_rng(0), 180).astype(np.float32) / 255
    canvas = np.zeros((200, 300), np.float32)
    canvas[10:190, 60:240] = np.where(slice_ > 0.1, np.maximum(slice_, 0.6), 0)
    ys, xs = np.nonzero(canvas)
    canvas[95:97, :] = 0.0  # a dark line across the whole slice, through the body
    top, left, bottom, right = body_box(canvas)
    # Both halves, up to the few edge pixels the morphological opening takes off the ellipse.
    assert top <= ys.min() + 4 and bottom >= ys.max() - 4 and left <= xs.min() + 4 and right >= xs.max() - 4
    assert bottom - top <= (ys.max() - ys.min()) + 10


def test_cam_maps_back_onto_the_original_pixels_through_the_crop():
    # A crop of 100 x 160 at (50, 100) of a 200 x 300 slice: padded to 160 x 160
    # with 30 rows above, resized to 32 x 32 (factor 0.2). A map that is a linear
    # ramp in x (or y) over the model input reads, at original pixel (r, c), the
    # input coordinate that pixel was resampled from, computed here by hand.
    geometry = Geometry(200, 300, (50, 100, 150, 260), 30, 0, 160)
    ramp = np.tile(np.arange(32, dtype=np.float32), (32, 1))
    for cam, coordinate in ((ramp, lambda r, c: (c - 100 + 0.5) * 0.2 - 0.5),
                            (ramp.T.copy(), lambda r, c: (r - 50 + 30 + 0.5) * 0.2 - 0.5)):
        full = cam_to_image(cam, geometry)
        assert full.shape == (200, 300)
        for r, c in ((60, 110), (99, 180), (140, 250)):
            assert full[r, c] == pytest.approx(coordinate(r, c), abs=1e-3)
        # Outside the crop the map fades to zero within CAM_FADE of the square's side (12.8 px here).
        assert not full[:37].any() and not full[163:].any() and not full[:, :87].any() and not full[:, 273:].any()


def test_a_blob_in_the_body_comes_back_where_it_was():
    canvas, _ = body_on_canvas()
    canvas[140:146, 60:66] = 1.0  # a bright spot inside the body
    config = PreprocessConfig(img_size=64, crop="body")
    x, geometry = model_input(canvas, config)
    grey = x[0, 0].numpy()
    heat = (grey >= grey.max() - 1e-6).astype(np.float32)  # the spot, as the model input shows it
    full = cam_to_image(heat, geometry)
    ys, xs = np.nonzero(full > 0.5)
    assert 138 <= ys.mean() <= 148 and 58 <= xs.mean() <= 68


@pytest.mark.parametrize("export", [lambda x: x ** 0.6, lambda x: x ** 1.6, lambda x: 0.2 + 0.6 * x])
def test_equalised_input_is_the_same_whatever_the_export_window_gamma_or_contrast(export):
    canvas, _ = body_on_canvas()
    canvas = np.clip(canvas + np.linspace(0, 0.3, canvas.shape[1], dtype=np.float32), 0, 1)  # many grey levels
    shifted = export(canvas).astype(np.float32)
    equalised = PreprocessConfig(img_size=64, crop="body", intensity="equalise")
    stretched = PreprocessConfig(img_size=64, crop="body", intensity="percentile")
    same = np.abs(to_square(shifted, equalised)[0] - to_square(canvas, equalised)[0]).mean()
    other = np.abs(to_square(shifted, stretched)[0] - to_square(canvas, stretched)[0]).mean()
    # Up to the rounding of grey levels: a monotonic change of the export leaves the histogram's
    # ranks, which is what equalisation keeps; a percentile stretch keeps only linear changes.
    assert same < 0.03
    if export(np.float32(0.5)) != pytest.approx(0.2 + 0.6 * 0.5):  # a non-linear change
        assert other > 3 * same


@pytest.mark.slow
def test_fit_cv_reports_out_of_fold_and_resumes_after_a_kill(tmp_path):
    data = tmp_path / "data"
    write_classes(data / "train", ["alpha_stage_T1", "beta"], 14, size=40)
    write_classes(data / "valid", ["alpha_stage_T1", "beta"], 4, seed=1, size=40, start=100)
    write_classes(data / "test", ["alpha", "beta"], 3, seed=2, size=40, start=200)
    # A copy of a training image in valid: kept once by the audit's policy.
    Image.open(next((data / "train" / "beta").iterdir())).save(data / "valid" / "beta" / "copy.png")
    argv = ["--data", str(data), "--cv", "3", "--arch", "baseline", "--img-size", "32", "--batch-size", "4",
            "--epochs", "3", "--workers", "1", "--weight-storage", "fp32", "--quiet"]

    def fit(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "training.fit", *argv, "--out", str(out), *extra],
                                cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    reference = fit(tmp_path / "reference")
    killed = fit(tmp_path / "killed")
    marker = tmp_path / "killed" / "cv" / "fold-1" / "last.pt"
    deadline = time.monotonic() + 240
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, killed.communicate()[1]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model.pt").exists()
    assert reference.wait(300) == 0, reference.communicate()[1]
    resumed = fit(tmp_path / "killed", "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stderr

    out = tmp_path / "reference"
    with open(out / "cv" / "folds.csv") as f:
        folds = list(csv.DictReader(f))
    with open(out / "eval_report.csv") as f:
        rows = list(csv.DictReader(f))
    index = scan_dataset(data)
    labelled = [s for s in index.samples if s.split != "test"]
    assert len(labelled) == 37
    # Every labelled image once, the copy left out, the test split never touched.
    assert len(rows) == len(folds) == 36
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in folds)
    assert not any(r["path"].startswith("test") for r in rows)
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    assert {r["uncertain"] for r in rows} <= {"True", "False"}
    report = json.loads((out / "eval_report.json").read_text())
    assert report["out_of_fold"] and report["images"] == 36 and report["folds"] == 3
    assert set(report["fold_spread"]["accuracy"]) == {"mean", "std", "folds"}
    correct = [r["true"] == r["pred"] for r in rows]
    assert report["accuracy"] == pytest.approx(np.mean(correct))
    answered = [r["uncertain"] == "False" for r in rows]
    assert report["coverage"] == pytest.approx(np.mean(answered))
    card = json.loads((out / "model_card.json").read_text())
    assert card["validation"]["images"] == 36 and "out-of-fold" in card["calibration"]["method"]
    assert card["selective_answers"]["statement"].startswith(("When it answers", "It declined"))
    # The resumed run ends where the uninterrupted one did.
    with open(tmp_path / "killed" / "eval_report.csv") as f:
        assert list(csv.DictReader(f)) == rows
    # Two cross-validated runs on the same folds make an ensemble with its own out-of-fold report
    # (here the two runs are the same model, so the ensemble's figures are the member's).
    from training.ensemble import run as make_ensemble

    assert make_ensemble(["--members", str(out), str(tmp_path / "killed"), "--out", str(tmp_path / "ens")]) == 0
    ensemble_report = json.loads((tmp_path / "ens" / "eval_report.json").read_text())
    assert ensemble_report["images"] == 36 and ensemble_report["accuracy"] == pytest.approx(report["accuracy"])
    ensemble_card = json.loads((tmp_path / "ens" / "model_card.json").read_text())
    assert set(ensemble_card["member_comparison"]) == {"ensemble", "reference", "killed"}


def test_stored_paths_of_one_root_and_of_pooled_sources_find_their_images(tmp_path, monkeypatch):
    from training.crossval import stored_path
    (tmp_path / "a" / "c0").mkdir(parents=True)
    (tmp_path / "a" / "c0" / "x.png").write_bytes(b"")
    assert stored_path("c0/x.png", tmp_path / "a") == tmp_path / "a" / "c0" / "x.png"
    monkeypatch.chdir(tmp_path / "a")  # pooled sources: rows keep the path as fit was given it
    assert stored_path("../a/c0/x.png", Path("/elsewhere")).resolve() == (tmp_path / "a" / "c0" / "x.png").resolve()


def test_a_cross_validation_resumes_its_unfinished_folds_and_refuses_other_fold_settings(tmp_path, capsys):
    from training.fit import run

    write_classes(tmp_path / "data", ["alpha", "beta"], 8, size=32)
    argv = ["--data", str(tmp_path / "data"), "--cv", "2", "--arch", "baseline", "--img-size", "32", "--batch-size",
            "8", "--epochs", "1", "--workers", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert run([*argv, "--stop-after", "1"]) == 0
    assert (tmp_path / "run" / "cv" / "folds.csv").is_file() and not (tmp_path / "run" / "model.pt").exists()
    capsys.readouterr()
    assert run([*argv, "--resume", "--seed", "5"]) == 2
    assert "the data or the fold settings (--cv, --seed, --split-block, --group-pattern) changed since this run " \
           "started; use a new --out" in capsys.readouterr().err
    assert run([*argv[:3], "1", *argv[4:]]) == 2
    assert "--cv needs at least 2 folds, got 1" in capsys.readouterr().err

    first_fold = tmp_path / "run" / "cv" / "fold-0" / "model.pt"
    written = first_fold.stat().st_mtime_ns
    capsys.readouterr()
    loud = [a for a in argv if a != "--quiet"]
    assert run([*loud, "--resume"]) == 0  # the finished fold is kept, the others and the final model trained
    assert first_fold.stat().st_mtime_ns == written
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cross-validation ")]
    assert progress[-1].startswith("cross-validation 3/3 epochs | ")  # 2 folds and the final model, 1 epoch each
    with open(tmp_path / "run" / "eval_report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(
        p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").glob("*/*.png"))
    assert (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.parametrize("change, words", [
    ({"img_size": 16}, "img_size must be at least 32, got 16"), ({"crop": "lungs!"}, "crop must be one of"),
    ({"intensity": "zscore"}, "intensity must be one of"), ({"mean": (0.5, 0.5)}, "one value per channel")])
def test_preprocessing_settings_are_checked_when_made(change, words):
    with pytest.raises(ValueError, match=words):
        PreprocessConfig(**change)


def test_a_cross_validation_refuses_a_class_whose_images_are_all_unreadable(tmp_path, capsys):
    from training.fit import run

    write_classes(tmp_path / "data", ["alpha", "beta"], 6, size=32)
    (tmp_path / "data" / "gamma").mkdir()
    Image.new("L", (32, 32), 90).save(tmp_path / "data" / "gamma" / "only.png")
    argv = ["--data", str(tmp_path / "data"), "--cv", "2", "--arch", "baseline", "--img-size", "32",
            "--epochs", "1", "--workers", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert run(argv) == 2  # one readable image: too few for the folds, but readable
    assert "class 'gamma' has only 1 image, but 2-fold cross-validation needs at least 2 per class" in \
        capsys.readouterr().err
    for path in (tmp_path / "data" / "beta").iterdir():
        path.write_bytes(b"not an image")
    assert run([*argv[:-1], str(tmp_path / "run-2")]) == 2
    assert "class(es) ['beta'] have no readable images; add images or remove the folder" in capsys.readouterr().err


def _write_cv_member(folder: Path, per_fold: list[dict], rows: list[tuple]) -> Path:
    """A cross-validated network's report: rows (fold, p_a, ood score, far score), classes a and b."""
    folder.mkdir(parents=True)
    with open(folder / "eval_report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "source", "fold", "true", "p_a", "p_b", "ood_score", "far_score"])
        for i, (fold, p_a, ood, far) in enumerate(rows):
            writer.writerow([f"r{i}.png", "s", fold, "a", p_a, 1 - p_a, ood, far])
    (folder / "eval_report.json").write_text(json.dumps({"out_of_fold": True, "class_names": ["a", "b"],
                                                         "crossfit": {"per_fold": per_fold}}))
    return folder


def test_out_of_fold_states_use_the_thresholds_of_each_rows_fold(tmp_path):
    from ctapp.inference import CONFIDENT, LOW_CONFIDENCE, NOT_CHEST_CT, UNLIKE_TRAINING
    from training.crossval import OutOfFold

    per_fold = [{"fold": 0, "confidence_threshold": 0.7, "ood_threshold": 1.0, "far_threshold": 3.0},
                {"fold": 1, "confidence_threshold": 0.9, "ood_threshold": 5.0, "far_threshold": None}]
    rows = [("0", 0.8, "0.5", "0.5"),  # like the training images, confident enough
            ("0", 0.6, "0.5", "0.5"),  # below fold 0's confidence threshold
            ("0", 0.8, "2", "2"),  # past the near threshold only
            ("0", 0.8, "2", "4"),  # past the far one: not a chest CT
            ("0", 0.8, "4", ""),  # a row from before the far score: its one score for both
            ("1", 0.8, "2", "9"),  # fold 1's own thresholds: low confidence there
            ("1", 0.95, "2", "9"),
            ("1", 0.95, "6", "9")]  # a fold without a far threshold
    scores = OutOfFold([_write_cv_member(tmp_path / "net", per_fold, rows)]).scores()
    assert scores.states == [CONFIDENT, LOW_CONFIDENCE, UNLIKE_TRAINING, NOT_CHEST_CT, NOT_CHEST_CT, LOW_CONFIDENCE,
                             CONFIDENT, UNLIKE_TRAINING]
    assert scores.reasons[5] == ["low confidence: the top probability 80% is below 90%"]
    assert scores.probs[:, 0].tolist() == [p_a for _, p_a, _, _ in rows]


def test_out_of_fold_rows_are_refused_unless_cross_validated_alike(tmp_path):
    from ctapp.checkpoint import CheckpointError
    from training.crossval import OutOfFold

    per_fold = [{"fold": k, "confidence_threshold": 0.7, "ood_threshold": 1.0} for k in (0, 1)]
    a = _write_cv_member(tmp_path / "a", per_fold, [("0", 0.8, "0.5", ""), ("1", 0.8, "0.5", "")])
    b = _write_cv_member(tmp_path / "b", per_fold, [("1", 0.8, "0.5", ""), ("1", 0.8, "0.5", "")])
    with pytest.raises(CheckpointError, match=re.escape(f"{b}: its out-of-fold images or folds differ from {a}'s")):
        OutOfFold([a, b])
    (b / "eval_report.json").write_text(json.dumps({"out_of_fold": False}))
    with pytest.raises(CheckpointError, match="its report is not out-of-fold; train it with training.fit --cv"):
        OutOfFold([a, b])
    (a / "eval_report.csv").unlink()
    with pytest.raises(CheckpointError, match=r"no out-of-fold rows \(eval_report.csv\)"):
        OutOfFold([a])
