"""Issue 11, folder evaluation: nothing outside the permitted data roots is read
(symlinks followed and refused), report rows cannot name files outside them,
one evaluation runs at a time without holding the shared model for the whole
run, and old user reports are pruned."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import write_classes
from tiny_models import tiny_model, write_model_folder

import ctapp.inference
from ctapp import ui_cache
from ctapp.checkpoint import sha256_file
from ctapp.model_folders import ModelEntry
from ctapp.paths import PathNotAllowed, files_inside, resolve_data_file

_opened: list[Path] | None = None  # files opened while a test records (see opened_files)


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(Path(args[0].decode() if isinstance(args[0], bytes) else args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only inside opened_files


@pytest.fixture
def opened_files():
    """Every file this process opens (Python's 'open' audit event) during the test."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


@pytest.fixture
def escape_root(tmp_path) -> tuple[Path, Path, Path]:
    """(data root, evaluated folder, outside folder): the folder holds real images
    and symlinks, to a file and to folders, that lead outside the root."""
    outside, root = tmp_path / "outside", tmp_path / "root"
    write_classes(outside, ["class0", "class1"], 3, seed=7)
    folder = root / "set"
    write_classes(folder / "valid", ["class0", "class1"], 3)
    (folder / "valid" / "class0" / "leak.png").symlink_to(outside / "class0" / "class0 (0).png")
    (folder / "valid" / "class1" / "more").symlink_to(outside / "class1", target_is_directory=True)
    (folder / "valid" / "class0_extra").symlink_to(outside / "class0", target_is_directory=True)
    return root, folder, outside


@pytest.fixture
def model_entry(tmp_path) -> ModelEntry:
    folder = write_model_folder(tmp_path / "models" / "tiny")
    return ModelEntry(folder, "tiny", {"task": "class0 / class1"})


def test_folder_evaluation_reads_nothing_outside_the_root(escape_root, model_entry, opened_files, monkeypatch,
                                                          tmp_path):
    from pages.compare import evaluate_folder

    root, folder, outside = escape_root
    monkeypatch.setenv("CTAPP_REPORTS_DIR", str(tmp_path / "reports"))
    path = evaluate_folder(model_entry, folder, "all", dedupe=False, roots=[root])

    read = sorted({p for p in opened_files if p.suffix == ".png"})
    assert len(read) == 6  # the six real images, each read once: scored and hashed from the same bytes
    assert len([p for p in opened_files if p.suffix == ".png"]) == 6
    assert not [p for p in opened_files if p.resolve().is_relative_to(outside.resolve())]
    report = ui_cache.read_json(path)
    # leak.png and the three images of the linked class folder (linked sub-folders, when listed, too)
    assert report["images_found"] == 6 and report["outside_data_roots"] >= 1 + 3
    rows = ui_cache.predictions(path)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in read)
    assert not any("leak" in r["path"] or "more" in r["path"] or "extra" in r["path"] for r in rows)
    # Each row names its image below the data root, with the hash of its bytes, whatever the report's data folder.
    assert all(r["image"] == f"set/{r['path']}" and r["sha256"] == sha256_file(folder / r["path"]) for r in rows)


def test_files_inside_splits_on_the_real_location(escape_root):
    root, folder, _ = escape_root
    paths = sorted(p for p in folder.rglob("*.png"))  # rglob lists leak.png, not the linked folders
    inside, outside = files_inside(paths, [root])
    assert [p.name for p in outside] == ["leak.png"] and len(inside) == 6


RELATIVE_ONLY, OUTSIDE = "^a report may only name files relative to its data folder$", \
    "^the file lies outside the data folders this server allows$"


@pytest.mark.parametrize("row, reason", [
    ("/etc/passwd", RELATIVE_ONLY), ("", RELATIVE_ONLY), ("a\x00b", RELATIVE_ONLY),
    ("../../outside/class0/class0 (0).png", OUTSIDE), ("valid/class0/leak.png", OUTSIDE),
    ("valid/class1/more/class1 (0).png", OUTSIDE), ("valid/class0/missing.png", "^no such file$")])
def test_report_rows_cannot_name_files_outside_the_roots(escape_root, row, reason, monkeypatch):
    from pages.compare import image_file

    root, folder, _ = escape_root
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(root))
    with pytest.raises(PathNotAllowed, match=reason):
        resolve_data_file(row, folder, [root])
    assert image_file({"data": str(folder)}, {"path": row}) is None  # the page then says the file is not available


def test_report_rows_inside_the_roots_open(escape_root, monkeypatch):
    from pages.compare import image_file

    root, folder, _ = escape_root
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(root))
    expected = (folder / "valid" / "class0" / "class0 (1).png").resolve()
    assert resolve_data_file("valid/class0/class0 (1).png", folder, [root]) == expected
    assert image_file({"data": str(folder)}, {"path": "valid/class0/class0 (1).png"}) == expected
    assert image_file({"data": str(folder)}, {"path": "valid/class0/leak.png"}) is None
    assert image_file({}, {"path": "valid/class0/class0 (1).png"}) is None  # no data folder, no image name


def identity_of(path: Path, root: Path) -> dict:
    from ctapp.evaluation import image_identity

    return image_identity(path, [root])


@pytest.mark.parametrize("image", ["/etc/passwd", "../outside/class0/class0 (0).png", "set/valid/class0/leak.png",
                                   "set/valid/class1/more/class1 (0).png", "set/valid/class0/missing.png"])
def test_an_image_name_cannot_lead_outside_the_roots(escape_root, image, monkeypatch):
    from pages.compare import image_file

    root, _, outside = escape_root
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(root))
    # Even with the hash of the outside file it names, nothing outside is found (by name or by hash).
    row = {"path": "x.png", "image": image, "sha256": sha256_file(outside / "class0" / "class0 (0).png")}
    assert image_file({}, row) is None


def test_an_image_is_named_below_its_root_and_found_by_name_or_hash(escape_root, tmp_path, monkeypatch):
    from pages.compare import image_file

    root, folder, outside = escape_root
    image = folder / "valid" / "class0" / "class0 (1).png"
    row = identity_of(image, root)
    assert row == {"image": "set/valid/class0/class0 (1).png", "sha256": sha256_file(image)}
    assert identity_of(folder / "valid" / "class0" / "leak.png", root)["image"] == ""  # its file lies outside
    assert identity_of(folder / "missing.png", root) == {"image": "", "sha256": ""}
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(root))
    assert image_file({}, row) == image.resolve()
    moved = root / "moved" / image.name
    moved.parent.mkdir()
    image.rename(moved)
    assert image_file({}, row) == moved.resolve()  # not at its name any more: found by its hash
    moved.write_bytes(b"other bytes")
    assert image_file({}, row) is None  # a file whose bytes changed is not the image evaluated


def test_the_roots_a_caller_names_win_over_the_servers(escape_root, tmp_path, monkeypatch):
    root, folder, _ = escape_root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(elsewhere))
    row = "valid/class0/class0 (1).png"
    assert resolve_data_file(row, folder, [root]) == (folder / row).resolve()
    with pytest.raises(PathNotAllowed, match=OUTSIDE):
        resolve_data_file(row, folder)  # no roots named: the server's, which do not hold it


# ------------------------------------------------------------------ one at a time, model shared


def test_a_folder_evaluation_is_indexed_under_the_signed_in_user(tmp_path, monkeypatch):
    from ctapp.store import Store

    store = Store(tmp_path / "audit.sqlite")
    monkeypatch.setattr(ui_cache, "audit_log", lambda: store)
    monkeypatch.setattr(ui_cache, "user_identity", lambda: "dr.a@example.org")
    try:
        ui_cache.record_evaluation(tmp_path / "reports" / "eval-1.json", {
            "model": "lung-vgg19_bn", "model_version": "2026-11-01", "evaluated_on": "clinic (test split)",
            "images": 40, "accuracy": 0.9, "macro_f1": 0.85})
        ui_cache.record_evaluation("eval-2.json", {})
        second, first = store.reports()
    finally:
        store.close()
    assert {k: first[k] for k in ("username", "model", "model_version", "report", "evaluated_on", "images",
                                  "accuracy", "macro_f1")} == {
        "username": "dr.a@example.org", "model": "lung-vgg19_bn", "model_version": "2026-11-01",
        "report": "eval-1.json", "evaluated_on": "clinic (test split)", "images": 40, "accuracy": 0.9, "macro_f1": 0.85}
    assert {k: second[k] for k in ("model", "model_version", "evaluated_on", "images", "accuracy", "macro_f1")} == {
        "model": "", "model_version": "", "evaluated_on": "", "images": 0, "accuracy": None, "macro_f1": None}


def test_the_audit_log_opens_the_database_url_when_one_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("CTAPP_DATABASE_URL", f"sqlite:///{tmp_path / 'department.sqlite'}")
    ui_cache._store.clear()
    try:
        store = ui_cache.audit_log()
        assert store.engine.url.database == str(tmp_path / "department.sqlite")
        store.record(model="m", model_version="v", image_sha256="ab" * 32, prediction="alpha",
                     probabilities={"alpha": 1.0})
        assert store.count() == 1 and (tmp_path / "department.sqlite").is_file()
    finally:
        ui_cache._store.clear()


def test_one_evaluation_slot_per_process():
    results = []
    with ui_cache.evaluation_slot() as first:
        worker = threading.Thread(target=lambda: results.append(ui_cache.evaluation_slot().__enter__()))
        worker.start()
        worker.join()
        assert first is True and results == [False]
    with ui_cache.evaluation_slot() as again:
        assert again is True


def test_forward_batch_in_chunks_equals_one_pass():
    model = tiny_model()
    images = torch.rand(10, 1, 48, 48)
    whole = ctapp.inference.batched_forward(model.model, images, model.preprocess, batch_size=64,
                                            memory_format=torch.contiguous_format)
    logits, features = model.forward_batch(images, batch_size=3)
    assert np.allclose(logits, whole[0], atol=1e-5)
    assert features.keys() == whole[1].keys()
    empty_logits, _ = model.forward_batch(images[:0])
    assert len(empty_logits) == 0


def test_forward_batch_lets_other_requests_through_between_chunks(monkeypatch):
    """A long evaluation holds the model's lock one chunk at a time: a predict()
    waiting on it gets in before the evaluation ends."""
    model = tiny_model()
    real = ctapp.inference.batched_forward
    chunks_done = []

    def slow_chunk(*args, **kwargs):
        time.sleep(0.05)
        out = real(*args, **kwargs)
        if threading.current_thread() is evaluation:  # predict() runs its slice through the same forward
            chunks_done.append(1)
        return out

    monkeypatch.setattr(ctapp.inference, "batched_forward", slow_chunk)
    total = 8
    evaluation = threading.Thread(target=model.forward_batch, args=(torch.rand(4 * total, 1, 48, 48), 4))
    evaluation.start()
    while not chunks_done:
        time.sleep(0.001)
    model.predict(np.zeros((48, 48), np.float32))
    got_in_after = len(chunks_done)
    evaluation.join()
    assert len(chunks_done) == total
    assert got_in_after < total, "predict() waited for the whole evaluation"


# ------------------------------------------------------------------ old reports pruned


def test_old_user_reports_are_pruned(tmp_path):
    from pages.compare import MAX_USER_REPORTS, prune_reports

    stamps = [f"202601{day:02d}T{hour:02d}0000" for day in range(1, 29) for hour in (8, 20)]
    for stamp in stamps:
        (tmp_path / f"tiny--data--{stamp}.json").write_text("{}")
        (tmp_path / f"tiny--data--{stamp}.csv").write_text("path\n")
    (tmp_path / "operator-notes.json").write_text("{}")
    deleted = prune_reports(tmp_path)
    kept = sorted(p.name for p in tmp_path.glob("tiny--*.json"))
    assert len(kept) == MAX_USER_REPORTS and len(deleted) == len(stamps) - MAX_USER_REPORTS
    assert kept == sorted(f"tiny--data--{s}.json" for s in stamps[-MAX_USER_REPORTS:])  # the newest
    assert len(list(tmp_path.glob("tiny--*.csv"))) == MAX_USER_REPORTS
    assert (tmp_path / "operator-notes.json").exists()


def test_the_model_pages_read_a_folders_training_history_and_follow_its_rewrites(tmp_path):
    import os

    (tmp_path / "history.csv").write_text("epoch,train_loss\n1,0.9\n2,0.5\n")
    assert ui_cache.history(tmp_path) == [{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.5}]
    (tmp_path / "history.csv").write_text("epoch,train_loss\n1,0.8\n")
    os.utime(tmp_path / "history.csv", (1e9, 1e9))  # another file time: a new cache entry
    assert ui_cache.history(tmp_path) == [{"epoch": 1, "train_loss": 0.8}]
    assert ui_cache.history(tmp_path / "missing") == []


def test_a_training_history_is_empty_until_written_then_read_fresh(tmp_path):
    assert ui_cache.history(tmp_path) == []  # a model trained before histories were kept
    (tmp_path / "history.csv").write_text("epoch,train_loss\n1,0.9\n", encoding="utf-8")
    assert ui_cache.history(tmp_path) == [{"epoch": 1.0, "train_loss": 0.9}]


@pytest.mark.parametrize("image", ["..", ".", "**", "*.png", "set/valid/class0/[c]lass0 (1).png"])
def test_an_image_name_is_never_a_pattern(escape_root, image, monkeypatch):
    from pages.compare import image_file

    root, folder, _ = escape_root
    monkeypatch.setenv("CTAPP_DATA_ROOTS", str(root))
    # The hash of a real image below the root: only a file of exactly that name could be it.
    row = {"path": "x.png", "image": image, "sha256": sha256_file(folder / "valid" / "class0" / "class0 (1).png")}
    assert image_file({}, row) is None
