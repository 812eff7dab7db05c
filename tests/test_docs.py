"""The commands and links of README.md and docs/*.md cannot rot.

Every line of a ```bash block is a command (a trailing ``\\`` joins lines, ``#`` lines are comments).
Each one is checked for what can be checked without a server:

* ``python -m MODULE ARGS`` of this project: MODULE exists and its own ``get_args_parser()``
  accepts ARGS, so a renamed module or option fails here; another module must be importable.
* a script (``benchmarks/x.py``, ``training/run_all.sh``, ``bash deploy/...``): the file exists, and
  every ``--option`` given is one the script's parser declares (or, for a script without
  ``get_args_parser``, one its source names).
* ``make TARGET``: the Makefile has the target.
* a command ending in ``# needs: WHAT`` (or ``# what it does; needs: WHAT``; server, postgres, nginx, orthanc, chromium, gpu, network,
  data, hours) says what a test cannot give it; it is checked as above where it is one of the
  kinds above, never run. Any other command without that mark fails: the test does not know it.

The cheap ones are also run, in this process: every ``python -m MODULE --help``, and ``training.audit`` on a small generated folder
in place of the data it names. Every relative link (and its ``#anchor``) must resolve.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import runpy
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS = {"server", "postgres", "nginx", "orthanc", "chromium", "gpu", "network", "data", "hours"}
OUR_PACKAGES = ("ctapp", "training", "benchmarks", "deploy")
PYTHONS = {".venv/bin/python", "python", "python3", "$PY"}
NEEDS_MARK = re.compile(r"#[^#]*?\bneeds:\s*([\w ,-]+)\s*$")  # "# needs: server" or "# what it does; needs: server"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str
    needs: frozenset[str]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def bash_commands(path: Path) -> list[Command]:
    commands, block, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            block = stripped == "```bash" if not block else False
            continue
        if not block or (not pending and (not stripped or stripped.startswith("#"))):
            continue
        start = start if pending else number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        mark = NEEDS_MARK.search(text)
        needs = frozenset(re.split(r"[ ,]+", mark.group(1).strip())) if mark else frozenset()
        commands.append(Command(path.relative_to(REPO).as_posix(), start, text, needs))
    return commands


COMMANDS = [c for doc in DOCS for c in bash_commands(doc)]


def words(command: Command) -> list[str]:
    """The command's words without leading VAR=value assignments and without its comment."""
    tokens = shlex.split(command.text, comments=True)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens.pop(0)
    return tokens


def options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def check_parsed(module_name: str, args: list[str], command: Command) -> None:
    module = importlib.import_module(module_name)
    assert hasattr(module, "get_args_parser"), f"{command}: {module_name} has no get_args_parser()"
    if "--help" in args or "-h" in args:
        return  # run for real by test_help_commands_run
    try:
        module.get_args_parser().parse_args(args)
    except SystemExit as exit_:
        pytest.fail(f"{command}: {module_name}'s parser refuses these arguments (exit {exit_.code})")


def check_script(script: str, args: list[str], command: Command) -> None:
    path = REPO / script
    assert path.is_file(), f"{command}: {script} does not exist"
    if path.suffix != ".py":
        return
    source = path.read_text(encoding="utf-8")
    if "def get_args_parser" in source:
        if {"--help", "-h"} & set(args):
            return  # nothing else is parsed after it
        spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        try:
            module.get_args_parser().parse_args(args)
        except SystemExit as exit_:
            pytest.fail(f"{command}: {script}'s parser refuses these arguments (exit {exit_.code})")
        return
    for option in set(options(args)) - {"--help"}:
        assert f'"{option}"' in source or f"'{option}'" in source, f"{command}: {script} knows no {option}"


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))


def check(command: Command) -> None:
    unknown = command.needs - NEEDS
    assert not unknown, f"{command}: unknown needs {sorted(unknown)} (known: {sorted(NEEDS)})"
    tokens = words(command)
    assert tokens, f"{command}: no command"
    program, args = tokens[0], tokens[1:]
    if program in PYTHONS and args[:1] == ["-m"]:
        module_name, rest = args[1], args[2:]
        if module_name.split(".")[0] in OUR_PACKAGES:
            check_parsed(module_name, rest, command)
        else:
            assert importlib.util.find_spec(module_name), f"{command}: no module {module_name}"
            for name in rest:
                if name.startswith("tests/") or name == "app.py":
                    assert (REPO / name.split("::")[0]).exists(), f"{command}: {name} does not exist"
        return
    if program in PYTHONS or program == "bash":
        if program == "bash" and args[:1] == ["-c"]:
            assert command.needs, f"{command}: an inline script needs a '# needs: ...' mark"
            return
        check_script(args[0], args[1:], command)
        return
    if program == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        missing = set(targets) - make_targets()
        assert not missing, f"{command}: the Makefile has no target {sorted(missing)}"
        return
    if "/" in program and not program.startswith((".venv/", "/", "~")):  # a script of the repository
        check_script(program, args, command)
        return
    assert command.needs, (f"{command}: test_docs does not know how to check this command; end it with "
                           f"'# needs: WHAT' ({', '.join(sorted(NEEDS))}) or teach test_docs")
    if program.startswith(".venv/bin/"):
        tool = Path(sys.executable).parent / Path(program).name
        assert tool.exists(), f"{command}: {tool.name} is not installed in this environment"


def test_the_documentation_shows_commands():
    docs = {c.doc for c in COMMANDS}
    assert "README.md" in docs and len(docs) >= 5, docs
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_every_command_is_checked(command):
    check(command)


@pytest.mark.parametrize("text", [
    ".venv/bin/python -m training.fit --data DIR --no-such-option 3",   # an option that was renamed
    ".venv/bin/python -m training.no_such_module --data DIR",            # a module that moved
    ".venv/bin/python benchmarks/no_such_script.py",
    ".venv/bin/python benchmarks/latency.py --no-such-flag",            # a script without get_args_parser
    "make deploy",                                                       # no such target
    "curl http://localhost:8501/_stcore/health",                         # unknown, and not marked
    "curl http://localhost:8501/_stcore/health   # needs: sunshine",     # an unknown need
])
def test_the_check_refuses_what_has_rotted(text):
    with pytest.raises((AssertionError, pytest.fail.Exception, ModuleNotFoundError)):
        check(Command("example.md", 1, text, frozenset(NEEDS_MARK.search(text).group(1).split())
                      if NEEDS_MARK.search(text) else frozenset()))


def test_a_marked_command_is_checked_for_the_rest():
    check(Command("example.md", 1, "curl http://localhost:8501/_stcore/health", frozenset({"server"})))
    with pytest.raises(AssertionError):  # a script it names must still exist
        check(Command("example.md", 1, "deploy/no-such.sh 2", frozenset({"nginx"})))


HELP_COMMANDS = [c for c in COMMANDS if {"--help", "-h"} & set(words(c)) and words(c)[1:2] == ["-m"] and not c.needs]


def run_module(module: str, args: list[str], monkeypatch) -> int:
    """``python -m module args`` in this process (its ``__main__`` path, as the shell runs it): the exit status."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    monkeypatch.chdir(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported by the check above
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


def module_and_args(command: Command) -> tuple[str, list[str]]:
    tokens = words(command)
    assert tokens[0] in PYTHONS and tokens[1] == "-m", f"{command}: not a 'python -m' command"
    return tokens[2], tokens[3:]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_help_commands_run(command, monkeypatch, capsys):
    module, args = module_and_args(command)
    assert run_module(module, args, monkeypatch) == 0, command
    assert capsys.readouterr().out.lower().startswith("usage:")


def tiny_dataset(root: Path) -> Path:
    """Two classes of three small grey slices each, one an exact copy (the audit must report it)."""
    rng = np.random.default_rng(0)
    for label in ("normal", "adenocarcinoma"):
        folder = root / label
        folder.mkdir(parents=True)
        for k in range(3):
            pixels = (rng.random((40, 40)) * (120 if label == "normal" else 255)).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{k}.png")
    (root / "normal" / "copy.png").write_bytes((root / "normal" / "0.png").read_bytes())
    return root


AUDIT_COMMANDS = [c for c in COMMANDS if "training.audit" in words(c)]


@pytest.mark.parametrize("command", AUDIT_COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_audit_commands_run_on_a_small_folder(command, tmp_path, monkeypatch, capsys):
    module, args = module_and_args(command)
    args[args.index("--data") + 1] = str(tiny_dataset(tmp_path / "data"))
    assert run_module(module, args, monkeypatch) == 0, command
    shown = capsys.readouterr().out
    assert "1 redundant copies" in shown or '"redundant_copies": 1' in shown, shown[-2000:]  # copy.png


def test_audit_commands_are_shown():
    assert AUDIT_COMMANDS, "the training guide shows how to audit a dataset"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, block = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            block = not block
        elif not block and re.match(r"#{1,6} ", line):
            found.add(slug(line.lstrip("#")))
    return found


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(doc):
    for link in relative_links(doc):
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: link {link} leads nowhere"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: {link}: {path.name} has no heading #{anchor}"


def test_the_slug_is_githubs():
    assert slug(" Cross-validation: figures that cannot flatter") == "cross-validation-figures-that-cannot-flatter"
    assert slug("Reading from a PACS") == "reading-from-a-pacs"
    assert slug("`make app` and `make test`") == "make-app-and-make-test"
