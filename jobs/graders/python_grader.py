"""python: the user's grade(sample, item) run in a child process, one child for many samples.

The child is started on first use and kept until close(); a sample that times out, or a child that
dies (a crash, the memory limit), costs that sample a score of 0 and the next sample a fresh child.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from jobs.graders.base import Grade, Grader, failed, finite, short
from jobs.graders.config import PythonConfig
from jobs.graders.sandbox import child_env
from jobs.graders.templates import context

CHILD = Path(__file__).with_name("_python_child.py")
STARTUP_TIMEOUT_S = 120.0  # importing the user's module may import torch


class ChildError(Exception):
    """The child timed out, died or failed to load grade(); the message says which."""


def _search_path() -> list[str]:
    # The child runs in its own temporary directory, so the trainer's working directory and any
    # relative PYTHONPATH entries are passed as absolute paths.
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [os.getcwd(), *(os.path.abspath(p) for p in extra)]


def _stop(proc: subprocess.Popen, workdir: str) -> None:
    """Kill the child's whole session (grade() may have started processes of its own)."""
    # Also when the child itself has exited: its session may outlive it. The child is not reaped
    # yet (its zombie keeps the group id from being reused) unless _death() already waited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        pipe.close()
    shutil.rmtree(workdir, ignore_errors=True)


class Child:
    """One interpreter running _python_child.py in a fresh temporary directory, without secrets."""

    def __init__(self, config: PythonConfig):
        self.workdir = tempfile.mkdtemp(prefix="rayft-grader-")
        self.log = Path(self.workdir, "stderr.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(config.memory_mb)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.workdir,
                env=child_env(TMPDIR=self.workdir, HOME=self.workdir),
                start_new_session=True,
            )
        self._buffer = b""
        # A grader dropped without close() still takes its child with it.
        self._finalizer = weakref.finalize(self, _stop, self.proc, self.workdir)
        setup = {"source": config.source, "function": config.function, "paths": _search_path()}
        try:
            reply = self.call(setup, STARTUP_TIMEOUT_S)
        except (ChildError, ValueError):
            self.stop()
            raise
        if "setup_error" in reply:
            self.stop()
            raise ChildError(f"loading grade failed: {reply['setup_error']}")

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            self.proc.stdin.write((json.dumps(request, default=str) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise ChildError(self._death()) from None
        return json.loads(self._read_line(timeout_s))

    def _read_line(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise ChildError(f"timed out after {timeout_s:g} s")
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise ChildError(self._death())
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "the grader process closed its output and stopped answering"
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        with contextlib.suppress(ValueError):
            how = f"signal {signal.Signals(-code).name}" if code < 0 else how
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return f"the grader process died ({how})" + (f": {lines[-1]}" if lines else "")

    def stop(self) -> None:
        self._finalizer()


class PythonGrader(Grader):
    config: PythonConfig

    def __init__(self, config: PythonConfig):
        super().__init__(config)
        self._child: Child | None = None

    def grade(self, samples: list[dict[str, Any]]) -> list[Grade]:
        grades, setup_error = [], None
        for sample in samples:
            if setup_error is None and self._child is None:
                try:
                    self._child = Child(self.config)
                except (
                    ChildError
                ) as e:  # e.g. an import error: the same for every sample of the batch
                    setup_error = short(str(e))
            grades.append(failed(self.name, setup_error) if setup_error else self._one(sample))
        return grades

    def _one(self, sample: dict[str, Any]) -> Grade:
        try:
            reply = self._child.call(context(sample), self.config.timeout_s)
        except (ChildError, ValueError) as e:  # ValueError: a reply that is not JSON
            self.close()  # a fresh child for the next sample
            return failed(self.name, short(str(e)))
        if "error" in reply:
            return failed(self.name, short(reply["error"]))
        try:
            score = finite(reply.get("score"))
        except ValueError as e:
            return failed(self.name, short(str(e)))
        return Grade(score, scores={self.name: score})

    def close(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None
