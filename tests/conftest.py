import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
for path in (ROOT, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SHARED_DATA = ROOT.parent / "shared" / "data"


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
