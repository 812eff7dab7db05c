"""McNemar's test between two models pairs their per-image rows by image, not
by position: two reports list the same images in different orders (each
evaluation writes rows in its own order), and the result must not change."""
from __future__ import annotations

import random

import pytest

from ctapp.metrics import mcnemar

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
    from pages.compare import pair_predictions

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
