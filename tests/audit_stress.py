"""The audit log under load: :func:`audit_writer` / :func:`hammer_audit_log`
write it from many threads and processes, :func:`kill_audit_writer` kills a
writer mid-write, :func:`verify_audit_log` checks that nothing was lost or
torn.
"""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path


def audit_writer(path: str, writer: str, count: int) -> int:
    """Write ``count`` records tagged ``writer``; returns how many were written.
    Runs in threads and in child processes."""
    from ctapp.store import Store

    log = Store(path)
    try:
        for i in range(count):
            log.record(model=f"model-{writer}", model_version="v1", image_sha256=f"{writer}:{i:06d}",
                       prediction="class0", probabilities={"class0": 0.75, "class1": 0.25},
                       flags=["low confidence"] if i % 2 else [])
    finally:
        log.close()
    return count


def _thread_group(path: str, prefix: str, threads: int, count: int) -> int:
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda k: audit_writer(path, f"{prefix}t{k}", count), range(threads)))


def hammer_audit_log(path: Path, *, processes: int = 4, threads: int = 4, count: int = 50) -> dict:
    """``processes`` processes each running ``threads`` writer threads (plus as
    many threads here) write ``count`` records each; then every record is
    checked (present once, intact) in a fresh connection."""
    from ctapp.store import Store

    path = Path(path)
    Store(path).close()  # create the schema before the race
    # fork: the children start at once (a spawned child would spend ~5 s importing
    # torch through ctapp/__init__); each opens its own connection, as a
    # separate server process would.
    ctx = get_context("fork")
    with ctx.Pool(processes) as pool:
        pending = [pool.apply_async(_thread_group, (str(path), f"p{p}", threads, count)) for p in range(processes)]
        here = _thread_group(str(path), "main", threads, count)
        written = here + sum(job.get(timeout=300) for job in pending)
    return {"written": written, **verify_audit_log(path, processes, threads, count)}


def _endless_writer(path: str, fd: int) -> None:
    """Child process: write records forever, reporting each committed id on ``fd``."""
    from ctapp.store import Store

    log = Store(path)
    i = 0
    while True:
        row_id = log.record(model="model-crash", model_version="v1", image_sha256=f"crash:{i:06d}",
                            prediction="class0", probabilities={"class0": 0.75, "class1": 0.25})
        os.write(fd, f"{row_id} crash:{i:06d}\n".encode())
        i += 1


def kill_audit_writer(path: Path, after: int = 100, timeout: float = 60) -> dict:
    """SIGKILL a process that is writing the log after it reported ``after``
    commits; then reopen the log (a restart) and check every reported
    record is there and the database is intact."""
    import sqlite3

    from ctapp.store import Store

    Store(path).close()
    read_fd, write_fd = os.pipe()
    child = get_context("fork").Process(target=_endless_writer, args=(str(path), write_fd), daemon=True)
    child.start()
    os.close(write_fd)
    reported, buffer = [], b""
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while len(reported) < after and time.monotonic() < deadline:
            chunk = pipe.read(4096)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            reported += [line.decode().split()[1] for line in lines]
        os.kill(child.pid, signal.SIGKILL)  # mid-write: it never stops writing
        child.join(10)
    log = Store(path)  # the restart
    try:
        stored = {r["image_sha256"] for r in log.diagnoses(model="model-crash", limit=10**9)}
        after_restart = log.record(model="model-restart", model_version="v1", image_sha256="restart",
                                   prediction="class0", probabilities={"class0": 1.0})
    finally:
        log.close()
    with sqlite3.connect(path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    return {"reported": len(reported), "stored": len(stored), "lost": len(set(reported) - stored),
            "integrity": integrity, "writable_after_restart": after_restart > 0, "exitcode": child.exitcode}


def verify_audit_log(path: Path, processes: int, threads: int, count: int) -> dict:
    """Reopen the log (as after a restart) and check every expected record."""
    import sqlite3

    from ctapp.store import Store

    log = Store(path)
    try:
        stored = log.count()
        rows = [(r["image_sha256"], r["model"], r["probabilities"], r["flags"], r["confidence"])
                for r in log.diagnoses(limit=10**9)]
    finally:
        log.close()
    expected = {f"{prefix}t{k}:{i:06d}" for prefix in [f"p{p}" for p in range(processes)] + ["main"]
                for k in range(threads) for i in range(count)}
    seen = [r[0] for r in rows]
    corrupt = 0
    for sha, model, probs, flags, confidence in rows:
        try:
            ok = (model == f"model-{sha.split(':')[0]}" and json.loads(probs) == {"class0": 0.75, "class1": 0.25}
                  and isinstance(json.loads(flags), list) and confidence == 0.75)
        except (ValueError, IndexError):
            ok = False
        corrupt += not ok
    with sqlite3.connect(path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    return {"stored": stored, "lost": len(expected - set(seen)), "duplicated": len(seen) - len(set(seen)),
            "unexpected": len(set(seen) - expected), "corrupt": corrupt, "integrity": integrity}
