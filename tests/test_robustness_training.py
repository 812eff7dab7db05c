"""Issue 5, interrupted training: ``training.fit`` killed with SIGKILL at
random moments (including in the middle of writing a checkpoint) never loses
its last good checkpoint, and ``--resume`` then finishes with exactly the
result of an uninterrupted run; bad data and a diverging loss stop with a
clear ``error:`` line and exit status 2."""
from __future__ import annotations

import pytest
from fork_server import ForkServer
from interrupted_training import (
    bad_datasets,
    compare_runs,
    fit_argv,
    kill_during_training,
    make_tiny_dataset,
    run_training,
    temp_files,
)

EPOCHS = 6


@pytest.fixture(scope="module")
def server():
    """``python -m training.fit`` runs forked from a process that has
    imported torch once (a fresh interpreter spends ~7 s on it here)."""
    with ForkServer() as server:
        yield server


@pytest.fixture(scope="module")
def failed_runs(server, tmp_path_factory):
    """Every bad dataset, trained at once."""
    root = tmp_path_factory.mktemp("bad_data")
    cases = bad_datasets(root)
    outs = {c.name: c.out or root / f"out_{i}" for i, c in enumerate(cases)}
    jobs = {c.name: server.start("training.fit", fit_argv(c.data, outs[c.name], 2, *c.args), root / "logs")
            for c in cases}
    results = {}
    for case in cases:
        job = jobs[case.name]
        job.wait(300)
        results[case.name] = (case, job.returncode, job.stdout, job.stderr, outs[case.name])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "loss becomes NaN",
    "empty class folder",
    "one class",
    "no readable images",
    "no such data folder",
    "four images in all",
    "resume another run",
])
def test_bad_training_data_stops_cleanly(failed_runs, name):
    case, code, _, stderr, out = failed_runs[name]
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr
    assert code == 2, f"exit status {code}\n{stderr[-1500:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for word in case.words:
        assert word.lower() in errors[0].lower(), errors[0]
    assert not (out / "model.pt").exists()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("train") / "data")


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(server, dataset, tmp_path):
    # The uninterrupted run trains alongside the killed ones.
    reference = server.start("training.fit", fit_argv(dataset, tmp_path / "reference", EPOCHS), tmp_path / "logs")
    try:
        report = kill_during_training(server, dataset, tmp_path / "killed", EPOCHS,
                                      moments=("writing last.pt", "mid-epoch", "writing a checkpoint",
                                               "writing model.pt"), timeout=200)
    finally:
        reference.wait(300)
    assert reference.returncode == 0, reference.stderr
    assert report.problems == []
    assert report.kills == 4 and report.finished_early == 0, report
    assert report.kills_during_write >= 2, report.moments  # a temp file was left: it died mid-write
    assert report.checkpoints_lost == 0
    assert report.checkpoints_checked >= 5  # last.pt after kills 2-4, best.pt after kills 2-4

    resumed = run_training(dataset, tmp_path / "killed", EPOCHS, "--resume", server=server)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    # Exact equality: every epoch reseeds the augmentation, dropout and
    # sampler from (seed, epoch), the optimizer state is restored from
    # last.pt and both runs use one CPU thread, so the arithmetic is the same.
    assert compare_runs(tmp_path / "reference", tmp_path / "killed", atol=0.0) == []
    # Temporary files left by the killed writers are never taken for checkpoints.
    assert report.leftover_temp_files == len(temp_files(tmp_path / "killed")) >= 1

