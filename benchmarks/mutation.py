"""Mutation testing of the core (``ctapp/`` and ``training/``) with mutmut: how
many small planted faults the test suite notices, per module.

    .venv/bin/python benchmarks/mutation.py                                   # every module (hours on 2 cores)
    .venv/bin/python benchmarks/mutation.py --modules ctapp/metrics.py ctapp/audit.py
    .venv/bin/python benchmarks/mutation.py --modules ctapp/metrics.py --report-only --survivors
    .venv/bin/python benchmarks/mutation.py --sample 40 --workdir /work/mutation   # 40 mutants per module

mutmut's settings are in ``pyproject.toml`` (``[tool.mutmut]``: the tests it runs,
process isolation). The run happens in a copy of the project under ``--workdir``
(default: a folder in the system's temporary directory), never in the
repository: mutmut writes a ``mutants/`` tree beside the code it mutates. Each
mutant runs only the tests that call the mutated function, stopping at the first
failure. Too slow for CI: a benchmark. Figures are printed per module:
killed, survived, timed out (also a detection: the mutant hung the tests), no
tests (nothing calls the function), and the kill rate
(killed + timed out) / (all mutants checked).

Every mutant of the core is about ten thousand, a day of CPU on 2 cores.
``--sample N`` tests a seeded random sample of N mutants per module instead and
prints each kill rate with its 95% (Wilson) interval: an estimate to steer by,
with the whole run (same workdir, ``--resume``) as the final figure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCOPE = ("ctapp", "training")
COPIED = ("ctapp", "training", "pages", "tests", "benchmarks", "deploy", ".streamlit", "app.py", "pyproject.toml",
          ".gitignore", "README.md")
LINKED = ("models",)  # large and read-only: linked, not copied
STATUS_ORDER = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped", "not checked")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Mutation testing of ctapp/ and training/ with mutmut.", add_help=add_help)
    p.add_argument("--modules", nargs="+", default=None, metavar="PATH",
                   help="modules to mutate, e.g. ctapp/metrics.py (default: every module of ctapp/ and training/)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ctapp-mutation",
                   help="where the project is copied and mutmut runs")
    p.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    p.add_argument("--resume", action="store_true",
                   help="keep the results of an interrupted run in --workdir and test only the rest")
    p.add_argument("--git-ref", default=None, metavar="REF",
                   help="mutate the files committed at REF (plus files git does not track yet) instead of the "
                        "working tree, e.g. HEAD while other changes are in progress")
    p.add_argument("--without-tests", nargs="+", default=[], metavar="GLOB",
                   help="leave these test files out of the copy (e.g. 'test_pinned_*.py' to measure what they add)")
    p.add_argument("--report-only", action="store_true", help="print the figures of the last run, run nothing")
    p.add_argument("--survivors", action="store_true", help="also print the diff of every surviving mutant")
    p.add_argument("--json", type=Path, default=None, help="write the figures (and survivor names) to this file")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="test a seeded random sample of N mutants per module (kill rates with a 95%% interval)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    return p


def all_modules() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for folder in SCOPE for p in (REPO / folder).glob("*.py")
                  if p.name != "__init__.py")


def prepare(workdir: Path, modules: list[str], resume: bool, without_tests: list[str], git_ref: str | None) -> None:
    """A fresh copy of the project in ``workdir`` whose mutmut settings mutate ``modules`` only."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(workdir / "mutants", ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        source, target = REPO / name, workdir / name
        if target.is_dir():
            shutil.rmtree(target)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)
    if git_ref:
        _replace_with_committed(workdir, git_ref)
    for pattern in without_tests:
        for path in (workdir / "tests").glob(pattern):
            path.unlink()
    for name in LINKED:
        link = workdir / name
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(REPO / name, target_is_directory=True)
    # mutmut runs the tests in workdir/mutants/, whose ../shared must be the real data for the
    # golden and real-data tests (they skip without it, and mutants they would kill survive).
    shared = REPO.parent / "shared"
    if shared.is_dir() and not (workdir / "shared").exists():
        (workdir / "shared").symlink_to(shared, target_is_directory=True)
    settings = workdir / "pyproject.toml"
    text = settings.read_text(encoding="utf-8")
    if "[tool.mutmut]" not in text:
        raise SystemExit("pyproject.toml has no [tool.mutmut] section")
    only = "only_mutate = [" + ", ".join(json.dumps(m) for m in modules) + "]"
    settings.write_text(text.replace("[tool.mutmut]", "[tool.mutmut]\n" + only, 1), encoding="utf-8")


def _replace_with_committed(workdir: Path, ref: str) -> None:
    """Tracked files as committed at ``ref``; untracked (not ignored) files stay as in the working tree."""
    for name in COPIED:
        if (workdir / name).is_dir():
            tracked = subprocess.run(["git", "ls-files", "--", name], cwd=REPO, capture_output=True, text=True,
                                     check=True).stdout.split()
            for path in tracked:
                (workdir / path).unlink(missing_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "--", *COPIED], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    # The mutmut settings always come from the working tree.
    (workdir / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")


SAMPLE_FILE = "sample.json"
NO_MUTANT = "no-such-mutant-*"  # a filter that matches nothing: mutmut generates mutants and collects stats, then stops


def sampled_names(workdir: Path, modules: list[str], size: int, seed: int) -> list[str]:
    """A seeded sample of ``size`` mutants per module (all of a smaller module), kept in
    ``workdir/sample.json`` so that --resume and --report-only use the same one."""
    path = workdir / SAMPLE_FILE
    if path.is_file():
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["size"] == size and kept["seed"] == seed and sorted(kept["modules"]) == sorted(modules):
            return kept["names"]
    names = []
    for module in modules:
        every = sorted(statuses(workdir, module), key=_natural)
        names += sorted(random.Random(f"{seed}:{module}").sample(every, min(size, len(every))), key=_natural)
    path.write_text(json.dumps({"size": size, "seed": seed, "modules": modules, "names": names}, indent=1),
                    encoding="utf-8")
    return names


def run_mutmut(workdir: Path, max_children: int, names: list[str] | None = None, quiet: bool = False) -> int:
    env = dict(os.environ)
    # One thread per test process: the parallelism is the number of mutants in flight.
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(key, "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    log = workdir / "mutmut.log"
    print(f"running mutmut in {workdir} (log: {log})", flush=True)
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children),
                                  *(names or [])], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    if process.returncode != 0 and not quiet:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        print(f"mutmut exited with status {process.returncode}; end of its log:\n{tail}", file=sys.stderr)
    return process.returncode


def statuses(workdir: Path, module: str) -> dict[str, str]:
    """mutant name -> status, from mutmut's per-module results file."""
    from mutmut.stats import status_by_exit_code

    meta = workdir / "mutants" / (module + ".meta")
    if not meta.is_file():
        return {}
    codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items()}


def summarise(workdir: Path, modules: list[str], sample: list[str] | None = None) -> dict:
    from scipy.stats import binomtest

    rows, survivors = {}, {}
    chosen = set(sample) if sample is not None else None
    for module in modules:
        found = statuses(workdir, module)
        if chosen is not None:
            found = {name: status for name, status in found.items() if name in chosen}
        counts = Counter(found.values())
        checked = sum(v for k, v in counts.items() if k not in ("skipped", "not checked"))
        detected = counts["killed"] + counts["timeout"]
        rows[module] = {"mutants": len(found), **{k: counts.get(k, 0) for k in STATUS_ORDER},
                        "kill_rate": detected / checked if checked else None}
        if checked:
            interval = binomtest(detected, checked).proportion_ci(0.95, method="wilson")
            rows[module]["kill_rate_95"] = [interval.low, interval.high]
        survivors[module] = sorted((n for n, s in found.items() if s in ("survived", "no tests")), key=_natural)
    return {"modules": rows, "survivors": survivors}


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def print_table(summary: dict) -> None:
    rows = summary["modules"]
    header = f"{'module':28} {'mutants':>7} {'killed':>6} {'survived':>8} {'timeout':>7} {'no tests':>8} {'other':>5} " \
             f"{'kill rate' + (' (95% interval)' if summary.get('sampled') else ''):>9}"
    print(header)
    print("-" * len(header))
    total = Counter()
    for module, r in rows.items():
        other = r["suspicious"] + r["segfault"] + r["skipped"] + r["not checked"]
        rate = "n/a" if r["kill_rate"] is None else f"{r['kill_rate']:.1%}"
        if r["kill_rate"] is not None and r["kill_rate_95"][0] > 0 and summary.get("sampled"):
            rate += f" ({r['kill_rate_95'][0]:.0%}-{r['kill_rate_95'][1]:.0%})"
        print(f"{module:28} {r['mutants']:>7} {r['killed']:>6} {r['survived']:>8} {r['timeout']:>7} "
              f"{r['no tests']:>8} {other:>5} {rate:>9}")
        total.update({k: v for k, v in r.items() if isinstance(v, int)})
    checked = total["mutants"] - total["skipped"] - total["not checked"]
    rate = f"{(total['killed'] + total['timeout']) / checked:.1%}" if checked else "n/a"
    other = total["suspicious"] + total["segfault"] + total["skipped"] + total["not checked"]
    print(f"{'all':28} {total['mutants']:>7} {total['killed']:>6} {total['survived']:>8} {total['timeout']:>7} "
          f"{total['no tests']:>8} {other:>5} {rate:>9}")


def show_survivors(workdir: Path, summary: dict) -> None:
    for names in summary["survivors"].values():
        for name in names:
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir, capture_output=True,
                                  text=True).stdout
            print(f"\n# {name}\n{diff.strip()}")


def main(args: argparse.Namespace) -> int:
    modules = args.modules or all_modules()
    unknown = [m for m in modules if not (REPO / m).is_file() or Path(m).parts[0] not in SCOPE]
    if unknown:
        print(f"error: not a module of {' or '.join(SCOPE)}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    workdir = args.workdir.resolve()
    if workdir == REPO or REPO in workdir.parents:
        print("error: --workdir must be outside the repository", file=sys.stderr)
        return 2
    code = 0
    sample = None
    if not args.report_only:
        prepare(workdir, modules, args.resume, args.without_tests, args.git_ref)
        start = time.perf_counter()
        if args.sample:
            run_mutmut(workdir, args.max_children, [NO_MUTANT], quiet=True)  # generate and collect stats only
            sample = sampled_names(workdir, modules, args.sample, args.seed)
            if not sample:
                print(f"error: mutmut generated no mutants (see {workdir / 'mutmut.log'})", file=sys.stderr)
                return 1
            print(f"sample: {len(sample)} mutants ({args.sample} per module, seed {args.seed})")
        code = run_mutmut(workdir, args.max_children, sample)
        print(f"mutmut ran {time.perf_counter() - start:.0f} s with {args.max_children} worker(s)")
    elif args.sample:
        sample = sampled_names(workdir, modules, args.sample, args.seed)
    summary = summarise(workdir, modules, sample) | {"sampled": sample is not None}
    print_table(summary)
    if args.survivors:
        show_survivors(workdir, summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
