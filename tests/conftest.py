import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
for path in (ROOT, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SHARED_DATA = ROOT.parent / "shared" / "data"

from mutation_credit import pytest_fixture_setup, pytest_runtest_call  # noqa: E402, F401  (hooks)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present: the real-data checks need ../shared/data beside the repo")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from synthetic import make_split_dataset

    return make_split_dataset(tmp_path_factory.mktemp("tiny") / "data", ["alpha_stage_T1", "beta"], train=12, valid=4)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_dataset) -> Path:
    """A baseline CNN trained for two epochs on the tiny dataset (a few seconds)."""
    from training.fit import run

    out = tmp_path_factory.mktemp("models") / "tiny-baseline"
    code = run(["--data", str(tiny_dataset), "--arch", "baseline", "--epochs", "2", "--img-size", "48",
                "--batch-size", "8", "--out", str(out), "--quiet", "--workers", "1"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def three_class() -> dict:
    """The evaluation report of 60 noisy three-class predictions (20 per class)."""
    from synthetic import report_for

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return report_for(["adenocarcinoma", "normal", "squamous-cell-carcinoma"], y, probs,
                      ["Adenocarcinoma", "Normal", "Squamous cell carcinoma"])


@pytest.fixture(scope="session")
def binary() -> dict:
    """The evaluation report of six binary predictions (COVID positive)."""
    from synthetic import report_for

    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.4, 0.7, 0.8, 0.6, 0.3])
    return report_for(["covid", "non-covid"], y, np.stack([1 - p1, p1], axis=1), ["COVID", "non-COVID"])
