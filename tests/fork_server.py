"""Child processes for the robustness tests: :func:`child_env` (the
environment of a child running the project's code) and :class:`ForkServer`,
which runs ``python -m MODULE`` equivalents forked from a process that has
imported torch once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **extra}
    env.pop("CTAPP_MODELS_DIR", None)
    return env


_SERVER = r"""
import json, os, runpy, sys, threading, time, traceback
for name in sys.argv[1:]:
    __import__(name)
lock = threading.Lock()

def say(message):
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

def reap():
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(0.02)
            continue
        say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

threading.Thread(target=reap, daemon=True).start()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid:
        say({"started": pid, "id": job["id"]})
        continue
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(job["cwd"])
        exec(job.get("setup", ""), {})
        sys.argv = [job["module"], *job["argv"]]
        try:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
"""


class ForkServer:
    """Runs ``python -m MODULE ARGS`` equivalents fast: a server process imports
    ``preload`` once (torch takes ~7 s to import here) and forks a child per
    job, which runs the module as ``__main__`` through runpy, exactly as
    ``python -m`` does. Children are real processes: they can be killed with
    SIGKILL and report their exit status."""

    # Everything training.fit and ctapp.predict import, but not those modules
    # themselves: runpy runs them fresh as __main__.
    PRELOAD = ("ctapp.audit", "ctapp.evaluation", "ctapp.inference", "ctapp.metrics", "training.engine",
               "sklearn.model_selection", "sklearn.decomposition", "sklearn.covariance", "pydicom")

    def __init__(self, preload: tuple[str, ...] = PRELOAD, **env: str):
        import queue

        self.proc = subprocess.Popen([PYTHON, "-c", _SERVER, *preload], cwd=REPO, env=child_env(**env),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._started: queue.Queue = queue.Queue()
        self._exits: dict[int, int] = {}
        self._cond = threading.Condition()
        self._ids = iter(range(1 << 30))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if "started" in message:
                self._started.put(message["started"])
            else:
                with self._cond:
                    self._exits[message["exit"]] = message["code"]
                    self._cond.notify_all()

    def start(self, module: str, argv: list[str], logs: Path, setup: str = "") -> "ServerJob":
        logs.mkdir(parents=True, exist_ok=True)
        n = next(self._ids)
        job = {"id": n, "module": module, "argv": [str(a) for a in argv], "cwd": str(REPO), "setup": setup,
               "stdout": str(logs / f"job{n}.out"), "stderr": str(logs / f"job{n}.err")}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = self._started.get(timeout=120)
        return ServerJob(self, pid, Path(job["stdout"]), Path(job["stderr"]))

    def run(self, module: str, argv: list[str], logs: Path, setup: str = "", timeout: float = 300) -> "ServerJob":
        job = self.start(module, argv, logs, setup)
        job.wait(timeout)
        return job

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ServerJob:
    server: ForkServer
    pid: int
    stdout_path: Path
    stderr_path: Path
    returncode: int | None = None

    def poll(self) -> int | None:
        with self.server._cond:
            self.returncode = self.server._exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float = 300) -> int:
        with self.server._cond:
            if not self.server._cond.wait_for(lambda: self.pid in self.server._exits, timeout):
                raise TimeoutError(f"job {self.pid} still running after {timeout} s")
            self.returncode = self.server._exits[self.pid]
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")
