"""The conftest hooks that let mutmut see every test using a wide fixture (tests/mutation_credit.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

pytest_plugins = ["pytester"]

INNER_TESTS = """
import pytest
from mutmut.state import state

@pytest.fixture(scope="module")
def trained():
    state()._stats.add("training_run")  # as mutmut's trampoline records a call of a mutated function
    return 1

def test_first(trained):
    assert state()._stats == {"training_run"}

def test_second(trained):
    assert state()._stats == {"training_run"}
    assert state().duration_by_test[\"test_inner.py::test_second\"] > 0

def test_without_the_fixture():
    assert state()._stats == set()
"""

INNER_CONFTEST = """
from mutmut.state import state
from mutation_credit import pytest_fixture_setup, pytest_runtest_call

def pytest_runtest_teardown(item):  # as mutmut's statistics collector does after each test
    state()._stats.clear()
"""


@pytest.mark.parametrize("collecting, outcomes", [(True, {"passed": 3}), (False, {"passed": 2, "failed": 1})])
def test_a_wide_fixtures_calls_are_credited_to_every_test_that_uses_it(pytester, monkeypatch, collecting, outcomes):
    pytest.importorskip("mutmut")
    pytester.makepyfile(test_inner=INNER_TESTS)
    pytester.makeconftest(INNER_CONFTEST)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    if collecting:
        monkeypatch.setenv("MUTANT_UNDER_TEST", "stats")
    else:
        monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(**outcomes)
    if not collecting:  # without the hooks, only the first test saw the fixture's call
        result.stdout.fnmatch_lines(["*test_second*"])
