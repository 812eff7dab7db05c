"""Give the per-image rows of reports written before rows named their image
independently of the machine (``image``: the path below a data root, and
``sha256``: a hash of its bytes; see :func:`ctapp.evaluation.image_identity`)
those two columns, so that the dashboard can pair and open them anywhere.

    python -m training.identify_images models/*/eval_report.json

Run it from where the reports were written (the repository root for the
shipped models): a row's file is its ``path`` below the report's ``data``, or,
where that does not exist (sources pooled from several roots), its ``path`` as
given. An ensemble's rows take their members' identities, matched on ``path``
(its ``data`` becomes its first member's, which its paths are relative to).
Nothing else in a report changes; reports whose rows already carry the columns
are left alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ctapp.evaluation import IMAGE_COLUMNS, image_identity, read_predictions, write_report
from ctapp.model_folders import ENSEMBLE_FILE


def row_file(report: dict, row: dict) -> Path:
    below_data = Path(report.get("data") or ".") / row["path"]
    return below_data if below_data.exists() else Path(row["path"])


def member_reports(ensemble_report: Path) -> list[Path]:
    spec = json.loads((ensemble_report.parent / ENSEMBLE_FILE).read_text())
    return [ensemble_report.parent / member / "eval_report.json" for member in spec["members"]]


def identify(report_path: Path, roots: list[Path] | None = None) -> tuple[int, int]:
    """Add the identity columns to one report's rows; returns (rows, rows whose file was not found)."""
    report = json.loads(report_path.read_text())
    rows = read_predictions(report_path)
    if not rows or all(column in rows[0] for column in IMAGE_COLUMNS):
        return len(rows), 0
    if (report_path.parent / ENSEMBLE_FILE).is_file():
        members = member_reports(report_path)
        first = {row["path"]: row for row in read_predictions(members[0])}
        identities = [{k: first.get(row["path"], {}).get(k, "") for k in IMAGE_COLUMNS} for row in rows]
        report["data"] = json.loads(members[0].read_text()).get("data", "")
    else:
        identities = [image_identity(row_file(report, row), roots) for row in rows]
    rows = [{**row, **identity} for row, identity in zip(rows, identities)]
    write_report(report, rows, report_path)
    return len(rows), sum(not identity["sha256"] for identity in identities)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Add machine-independent image names and hashes to report rows.")
    p.add_argument("reports", nargs="+", type=Path, help="eval_report.json files (members before their ensembles)")
    args = p.parse_args(argv)
    # An ensemble copies its members' identities, so members go first whatever the order given.
    for path in sorted(args.reports, key=lambda r: (r.parent / ENSEMBLE_FILE).is_file()):
        total, missing = identify(path)
        print(f"{path}: {total} rows" + (f", {missing} whose file was not found (left unnamed)" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
