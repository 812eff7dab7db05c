"""Plant one mutant by hand, run the tests that should catch it, put the code back.

    .venv/bin/python benchmarks/plant_mutant.py ctapp/series_inputs.py \\
        'if len(members) > limits.max_zip_members:' 'if len(members) >= limits.max_zip_members:' \\
        -- tests/test_series.py -k limits_on_members

How each surviving mutant of ``benchmarks/mutation.py`` is checked once its test
is written: the new test must fail with the mutant in place. ``OLD`` must occur
exactly once in the file; the file is restored even when the run is interrupted.
Prints KILLED or SURVIVED and pytest's last line; exits 0 when killed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, old, new = Path(argv[0]), argv[1], argv[2]
    pytest_args = argv[4:]
    original = path.read_text(encoding="utf-8")
    if original.count(old) != 1:
        print(f"{path}: the text to replace occurs {original.count(old)} times, not once", file=sys.stderr)
        return 2
    path.write_text(original.replace(old, new), encoding="utf-8")
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args],
                             capture_output=True, text=True)
    finally:
        path.write_text(original, encoding="utf-8")
    last = (run.stdout.strip().splitlines() or [""])[-1]
    print(f"{'KILLED' if run.returncode else 'SURVIVED'} {path}: {new!r} | {last}")
    return 0 if run.returncode else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
