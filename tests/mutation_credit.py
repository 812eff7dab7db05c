"""Hooks for mutation testing (``benchmarks/mutation.py``), loaded by conftest.py.

mutmut runs, for each mutant, only the tests it saw calling the mutated
function. The work of a module- or session-scoped fixture (a training run, a
cross-validation) happens inside the first test that asks for it, so mutmut
credited it to that test alone and never ran the others that check the same
fixture's results against its mutants. While mutmut collects which test calls
what (``MUTANT_UNDER_TEST=stats``), a wider fixture's calls, and its time (from
which mutmut sets each mutant's CPU limit), are credited to every test that
uses it. Outside mutmut's collection these hooks do nothing.
"""
from __future__ import annotations

import os
import time

import pytest

_WIDE_FIXTURE_CALLS: dict = {}  # fixture definition -> (functions it called, seconds it took)


def _collecting_mutation_stats() -> bool:
    return os.environ.get("MUTANT_UNDER_TEST") == "stats"


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope == "function" or not _collecting_mutation_stats():
        yield
        return
    from mutmut.state import state

    calls, earlier = state()._stats, set(state()._stats)
    calls.clear()
    start = time.perf_counter()
    yield
    _WIDE_FIXTURE_CALLS[fixturedef] = (set(calls), time.perf_counter() - start)
    calls |= earlier


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if not _WIDE_FIXTURE_CALLS:
        return
    from mutmut.state import state

    used = {id(d) for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs}
    for fixturedef, (calls, seconds) in _WIDE_FIXTURE_CALLS.items():
        if id(fixturedef) in used:
            state()._stats.update(calls)
            state().duration_by_test[item.nodeid] += seconds
