"""Folders on the server that users may point the app at.

The operator lists data roots in ``CTAPP_DATA_ROOTS`` (separated by the OS path
separator); a user-supplied path is accepted only when it resolves (following
symlinks) to a folder inside one of them, and every file the app then reads
from it, or opens because a report names it, must resolve inside one too: a
symlink below a root that leads outside is never followed.
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_ROOTS_ENV = "CTAPP_DATA_ROOTS"
DEFAULT_DATA_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class PathNotAllowed(ValueError):
    """A path outside the configured data roots (or not an existing folder)."""


def data_roots() -> list[Path]:
    configured = os.environ.get(DATA_ROOTS_ENV)
    roots = [Path(p) for p in configured.split(os.pathsep) if p] if configured else [DEFAULT_DATA_ROOT]
    return [r.resolve() for r in roots if r.is_dir()]


def _roots(roots: list[Path] | None) -> list[Path]:
    return data_roots() if roots is None else [Path(r).resolve() for r in roots]


def is_inside(path: Path, roots: list[Path]) -> bool:
    """Whether ``path``, symlinks followed, lies in one of the (resolved) ``roots``."""
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        return False
    return any(real == root or real.is_relative_to(root) for root in roots)


def files_inside(paths: list[Path], roots: list[Path] | None = None) -> tuple[list[Path], list[Path]]:
    """``paths`` split into those that lie inside a data root (symlinks
    followed) and those that do not; nothing is opened."""
    roots = _roots(roots)
    inside, outside = [], []
    for path in paths:
        (inside if is_inside(path, roots) else outside).append(path)
    return inside, outside


def resolve_data_file(row_path: str, folder: str | Path, roots: list[Path] | None = None) -> Path:
    """The real file a report row names: a relative path below the report's data
    ``folder``, resolved and required to be a file inside a data root. An
    absolute row path, or one that leads outside the roots, is refused."""
    text = str(row_path or "")
    if not text or "\x00" in text or Path(text).is_absolute() or Path(text).drive:
        raise PathNotAllowed("a report may only name files relative to its data folder")
    path = Path(folder) / text
    if not is_inside(path, _roots(roots)):
        raise PathNotAllowed("the file lies outside the data folders this server allows")
    if not path.is_file():
        raise PathNotAllowed("no such file")
    return path.resolve()


def resolve_data_folder(user_path: str, roots: list[Path] | None = None) -> Path:
    """The real folder ``user_path`` names, relative to a data root (absolute
    paths are accepted only inside a root); refuses '..' escapes and symlinks
    leading outside."""
    roots = _roots(roots)
    if not roots:
        raise PathNotAllowed(f"no data folders are configured on this server (set {DATA_ROOTS_ENV})")
    text = (user_path or "").strip()
    if not text or "\x00" in text:
        raise PathNotAllowed("enter a folder path")
    shown = text if len(text) <= 200 else text[:200] + "..."
    candidate = Path(text)
    options = [candidate] if candidate.is_absolute() else [root / candidate for root in roots]
    escaped = False
    for option in options:
        try:
            real = option.resolve()
            inside = any(real == root or real.is_relative_to(root) for root in roots)
            if inside and real.is_dir():
                return real
        except (OSError, RuntimeError) as exc:  # symlink loop, name too long, permission denied
            # The system's words only: the exception's own text names the server's real path.
            reason = getattr(exc, "strerror", None) or ("a symbolic link loop" if isinstance(exc, RuntimeError)
                                                        else type(exc).__name__)
            raise PathNotAllowed(f"{shown}: not a usable folder path ({reason})") from None
        escaped |= not inside
    # A relative path is tried under every root; it is missing only when it
    # leads nowhere outside them (a '..' or symlink escape is reported as such).
    if not escaped:
        raise PathNotAllowed(f"{shown}: no such folder")
    raise PathNotAllowed(f"{shown}: outside the data folders this server allows ({', '.join(map(str, roots))})")
