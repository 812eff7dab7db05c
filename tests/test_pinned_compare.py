"""McNemar's test between two models pairs their per-image rows by image, not
by position: two reports list the same images in different orders (each
evaluation writes rows in its own order), and the result must not change. Rows
name their image below a data root with a hash of its bytes, so reports written
on different machines pair, and the shipped ensemble pairs with its members."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ctapp.metrics import mcnemar
from pages.compare import pair_predictions

IMAGES = [f"valid/{cls}/{i}.png" for cls in ("alpha", "beta") for i in range(6)]  # 12 images


def rows(correct: set[int], true: dict[int, str] | None = None) -> list[dict]:
    """Per-image rows of a two-class report: right on the images in ``correct``."""
    out = []
    for i, path in enumerate(IMAGES):
        label = (true or {}).get(i, path.split("/")[1])
        wrong = "beta" if label == "alpha" else "alpha"
        out.append({"path": path, "true": label, "pred": label if i in correct else wrong, "confidence": "0.9"})
    return out


# A right on 0-9 and wrong on 10-11; B right on 0-2, 10 and 11 only.
# By image: only A right on 3..9 (7 images), only B right on 10, 11 (2 images).
# Exact two-sided McNemar p = 2 * P(X <= 2), X ~ Bin(9, 1/2) = 2 * (1 + 9 + 36) / 512 = 92 / 512.
A_RIGHT, B_RIGHT = set(range(10)), {0, 1, 2, 10, 11}
P_BY_HAND = 92 / 512


def _test(rows_a: list[dict], rows_b: list[dict]) -> tuple[dict, object]:
    report = {"data": "/data/lung"}
    pairing = pair_predictions(report, rows_a, report, rows_b)
    return mcnemar(*pairing.correct), pairing


def test_mcnemar_counts_discordant_images_by_hand():
    result, pairing = _test(rows(A_RIGHT), rows(B_RIGHT))
    assert len(pairing.pairs) == 12
    assert (result["only_a_correct"], result["only_b_correct"]) == (7, 2)
    assert result["p_value"] == pytest.approx(P_BY_HAND)
    assert result["significant_at_0.05"] is False


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcnemar_pairs_rows_by_image_whatever_their_order(seed):
    shuffled = rows(B_RIGHT)
    random.Random(seed).shuffle(shuffled)
    assert [r["path"] for r in shuffled] != IMAGES
    result, pairing = _test(rows(A_RIGHT), shuffled)
    assert all(a["path"] == b["path"] for a, b in pairing.pairs)
    assert (result["only_a_correct"], result["only_b_correct"]) == (7, 2)
    assert result["p_value"] == pytest.approx(P_BY_HAND)


def test_mcnemar_uses_only_the_images_both_reports_share():
    # B evaluated on images 0..8 only, in reverse order: only A right on 3..8 (6), only B right on none.
    partial = list(reversed(rows(B_RIGHT)[:9]))
    result, pairing = _test(rows(A_RIGHT), partial)
    assert len(pairing.pairs) == 9
    assert (result["only_a_correct"], result["only_b_correct"]) == (6, 0)
    assert result["p_value"] == pytest.approx(2 / 2 ** 6)  # 2 * P(X = 0), X ~ Bin(6, 1/2)


def test_images_with_different_true_labels_are_left_out():
    relabelled = rows(B_RIGHT, true={3: "beta"})  # image 3 filed as beta in B's data
    result, pairing = _test(rows(A_RIGHT), list(reversed(relabelled)))
    assert pairing.label_mismatches == 1 and len(pairing.pairs) == 11
    assert (result["only_a_correct"], result["only_b_correct"]) == (6, 2)


# --------------------------------------------------------------------------- images named on any machine

def named(rows_: list[dict], root: str) -> list[dict]:
    """The rows as written on a machine whose data lies at ``root``: each names its
    image below the data root, with a hash standing for its bytes."""
    return [{**r, "path": f"{root}/{r['path']}", "image": f"lung/{r['path']}", "sha256": f"hash-{r['path']}"}
            for r in rows_]


def test_reports_written_on_different_machines_pair_on_the_image_name():
    # A's rows are relative to an absolute data folder, B's (an ensemble's) to none at all.
    rows_a, rows_b = named(rows(A_RIGHT), "/home/trainer/data/lung"), named(rows(B_RIGHT), "../shared/data/lung")
    pairing = pair_predictions({"data": "/home/trainer/data"}, rows_a, {}, list(reversed(rows_b)))
    assert len(pairing.pairs) == 12 and all(a["image"] == b["image"] for a, b in pairing.pairs)
    assert mcnemar(*pairing.correct)["p_value"] == pytest.approx(P_BY_HAND)


def test_a_moved_image_pairs_on_its_hash_and_a_changed_one_does_not_pair():
    rows_a, rows_b = named(rows(A_RIGHT), "a"), named(rows(B_RIGHT), "b")
    rows_b[0]["image"] = "elsewhere/0.png"  # the same bytes under another name: paired by hash
    rows_b[1]["sha256"] = "other bytes"  # the same name, other bytes: not the same image
    pairing = pair_predictions({}, rows_a, {}, rows_b)
    assert len(pairing.pairs) == 11
    assert (rows_a[0], rows_b[0]) in pairing.pairs and not any(b is rows_b[1] for _, b in pairing.pairs)


def test_copies_of_one_image_pair_one_to_one():
    rows_a, rows_b = named(rows(A_RIGHT), "a"), named(rows(B_RIGHT), "b")
    for r in rows_a[:2] + rows_b[:2]:
        r.update(image="", sha256="same bytes")  # two identical files under no data root
    pairing = pair_predictions({}, rows_a, {}, rows_b)
    assert len(pairing.pairs) == 12
    assert len({id(b) for _, b in pairing.pairs}) == 12


# --------------------------------------------------------------------------- the shipped models

MODELS = Path(__file__).resolve().parent.parent / "models"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (the datasets) is not beside the "
                                "repository: the shipped reports' images cannot be opened")


def shipped_pair(task: str, member: str):
    from ctapp.evaluation import read_predictions

    paths = [MODELS / f"{task}-ensemble" / "eval_report.json", MODELS / f"{task}-{member}" / "eval_report.json"]
    (report_a, rows_a), (report_b, rows_b) = [(json.loads(p.read_text()), read_predictions(p)) for p in paths]
    return report_a, report_b, pair_predictions(report_a, rows_a, report_b, rows_b)


# Out of fold, ensemble against member: images in common, only the ensemble right, only the member right.
SHIPPED = {("lung", "resnet50"): (577, 48, 9), ("lung", "vgg19_bn"): (577, 36, 12),
           ("covid", "resnet50"): (2526, 206, 128), ("covid", "vgg19_bn"): (2526, 282, 139)}


@pytest.mark.parametrize("task, member", list(SHIPPED))
def test_mcnemar_runs_on_the_shipped_ensemble_and_its_members(task, member):
    """Pairing needs no data folder: the rows name their images below a data root, on any clone."""
    report_a, report_b, pairing = shipped_pair(task, member)
    images, only_ensemble, only_member = SHIPPED[task, member]
    assert len(pairing.pairs) == images == report_a["images"] == report_b["images"]
    assert pairing.label_mismatches == 0
    result = mcnemar(*pairing.correct)
    assert (result["only_a_correct"], result["only_b_correct"]) == (only_ensemble, only_member)
    assert result["significant_at_0.05"] is True


@needs_data
@pytest.mark.parametrize("task", ["lung", "covid"])
def test_the_shipped_disagreements_open_under_the_shared_data_folder(task, monkeypatch):
    from ctapp.checkpoint import sha256_file
    from pages.compare import image_file

    monkeypatch.delenv("CTAPP_DATA_ROOTS", raising=False)  # the default: ../shared/data beside the repository
    report_a, report_b, pairing = shipped_pair(task, "resnet50")
    for row_a, row_b in pairing.disagreements[:5] + pairing.disagreements[-5:]:
        found = image_file(report_a, row_a)
        assert found == image_file(report_b, row_b) == (SHARED_DATA / row_a["image"]).resolve()
        assert sha256_file(found) == row_a["sha256"]


@needs_data
def test_an_image_found_by_its_hash_when_the_data_is_laid_out_differently(tmp_path, monkeypatch):
    from pages.compare import image_file

    report_a, _, pairing = shipped_pair("covid", "vgg19_bn")
    row = pairing.disagreements[0][0]
    moved = tmp_path / "data" / "reorganised" / Path(row["image"]).name
    moved.parent.mkdir(parents=True)
    moved.write_bytes((SHARED_DATA / row["image"]).read_bytes())
    (tmp_path / "data" / Path(row["image"]).name).write_bytes(b"another image under the same name")
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(tmp_path / "data"))
    assert image_file(report_a, row) == moved.resolve()
