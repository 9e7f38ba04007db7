"""Starting the worker process and talking to it, without Qt, so the same code runs in Slicer and in tests.

`WorkerClient` starts `python -m AACScoreLib.worker.server` on first use (Slicer's own PythonSlicer, or the Python
of an environment that holds the dependencies) and keeps it, so the models stay loaded between jobs. Each
`submit` returns a `WorkerJob` that the caller polls (a qt.QTimer in Slicer): progress, delivered items, end.
A reader thread files the worker's lines under their job; nothing here blocks the caller.

Cancel asks the worker to stop and, if the job has not ended `cancel_grace` seconds later (a model call that
cannot be interrupted), kills the process: the job ends cancelled within about that time, and the next job
starts a fresh worker. A worker that dies ends its job with a `WorkerError` saying so, with its last stderr lines.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from ..errors import AACScoreError
from .protocol import END_EVENTS, PROTOCOL_VERSION, decode, encode

LIBRARY_PARENT = Path(__file__).resolve().parents[2]
"""The folder that holds AACScoreLib (the module folder in Slicer), put on the worker's PYTHONPATH."""
SERVER_MODULE = "AACScoreLib.worker.server"
CANCEL_GRACE_SECONDS = 1.0
STDERR_LINES_KEPT = 40


class WorkerError(AACScoreError):
    """The worker reported a failure, or died; `details` holds its traceback or last stderr lines."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def worker_python(configured: str | None = None) -> str:
    """The Python that runs the worker: the configured one, else Slicer's PythonSlicer beside this Python (it
    sees the packages installed into Slicer), else this Python itself."""
    if configured:
        return configured
    here = Path(sys.executable).parent
    found = shutil.which("PythonSlicer") or shutil.which("PythonSlicer", path=str(here))
    return found or sys.executable


class WorkerJob:
    """One job: `poll()` returns (fraction, text, new items, done); afterwards `result`, `error` or `cancelled`.

    The interface is `workflow.Job`'s, so the panel polls either in the same way. `read_item` and
    `read_result` turn the worker's JSON into the caller's objects, on the polling thread.
    """

    def __init__(self, client: "WorkerClient", job_id: str, kind: str, folder: Path,
                 read_item: Callable[[dict], object] | None = None,
                 read_result: Callable[[dict], object] | None = None):
        self.client = client
        self.id = job_id
        self.kind = kind
        self.folder = folder
        self._read_item = read_item or (lambda item: item)
        self._read_result = read_result or (lambda result: result)
        self._messages: queue.Queue = queue.Queue()
        self._progress: tuple[float, str] = (0.0, "starting the worker")
        self._ended = threading.Event()
        self._end: dict | None = None
        self._cancel_requested = False
        self.result: object = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.loaded_models = False
        self.keep_files = False
        self.process: subprocess.Popen | None = None

    # the reader thread's side

    def _receive(self, message: dict) -> None:
        self._messages.put(message)
        if message.get("event") in END_EVENTS:
            self._ended.set()

    # the caller's side

    def poll(self) -> tuple[float, str, list, bool]:
        items, done = [], False
        while not done:
            try:
                message = self._messages.get_nowait()
            except queue.Empty:
                break
            event = message.get("event")
            if event == "progress":
                self._progress = (min(max(float(message["fraction"]), 0.0), 1.0), str(message["text"]))
            elif event == "item":
                items.append(self._read_item(message["item"]))
            elif event in END_EVENTS:
                done = True
                self._finish(message)
        fraction, text = self._progress
        return fraction, text, items, done

    def _finish(self, message: dict) -> None:
        self._end = message
        self.loaded_models = bool(message.get("loaded_models"))
        event = message["event"]
        if event == "done":
            try:
                self.result = self._read_result(message.get("result"))
            except Exception as error:  # noqa: BLE001 - shown to the user like any failure of the job
                self.error = error
        elif event == "error" and not self._cancel_requested:
            self.error = WorkerError(message.get("message", "the worker failed"), message.get("details", ""))
        else:  # cancelled, or stopped (killed) after a cancel
            self.cancelled = True
        self.client._job_finished(self)

    @property
    def done(self) -> bool:
        return self._end is not None

    def cancel(self) -> None:
        """Ask the worker to stop this job; kill the worker if it has not within the grace time."""
        if self._ended.is_set() or self._cancel_requested:
            return
        self._cancel_requested = True
        self.client._cancel(self)

    def is_cancelled(self) -> bool:
        return self._cancel_requested

    def wait(self, timeout: float | None = None) -> bool:
        """Poll until the job ends (scripts and tests); True when it ended in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._ended.wait(0.05 if remaining is None else min(0.05, remaining))
            self.poll()
        return True

    def run(self, timeout: float | None = None):
        """Wait for the end and return the result; raise the job's error (for scripts)."""
        if not self.wait(timeout):
            self.cancel()
            raise WorkerError(f"the worker's {self.kind} job took longer than {timeout:.0f} s and was cancelled")
        if self.error is not None:
            raise self.error
        return self.result


class WorkerClient:
    """The worker process, started on first use and kept; one job runs at a time, others wait in the worker."""

    def __init__(self, python: str | None = None, env: Mapping[str, str] | None = None,
                 cancel_grace: float = CANCEL_GRACE_SECONDS, temporary_dir: str | Path | None = None):
        self.python = worker_python(python)
        self.env = dict(env) if env is not None else None
        self.cancel_grace = cancel_grace
        self.temporary_dir = temporary_dir
        self._process: subprocess.Popen | None = None
        self._jobs: dict[str, WorkerJob] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stderr: collections.deque = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._log: queue.Queue = queue.Queue()
        self.ready: dict | None = None
        self._killed_to_cancel: subprocess.Popen | None = None

    # -- the process

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running():
            return
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(LIBRARY_PARENT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        self._stderr.clear()
        self.ready = None
        try:
            process = subprocess.Popen(
                [self.python, "-m", SERVER_MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=env, text=True, encoding="utf-8", errors="replace", bufsize=1,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        except OSError as error:
            raise WorkerError(f"cannot start the worker with {self.python}: {error}") from None
        self._process = process
        threading.Thread(target=self._read_stdout, args=(process,), name="AACScore worker stdout",
                         daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(process,), name="AACScore worker stderr",
                         daemon=True).start()

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to quit; kill it if it has not within `timeout` seconds."""
        process = self._process
        if process is None:
            return
        try:
            process.stdin.write(encode({"quit": True}))
            process.stdin.flush()
        except (OSError, ValueError):
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill(process)

    def take_log(self) -> list[str]:
        """The worker's stderr lines since the last call (for the caller's log, on its own thread)."""
        lines = []
        while True:
            try:
                lines.append(self._log.get_nowait())
            except queue.Empty:
                return lines

    # -- jobs

    def submit(self, kind: str, params: dict | None = None, folder: str | Path | None = None,
               read_item: Callable[[dict], object] | None = None,
               read_result: Callable[[dict], object] | None = None,
               prepare: Callable[[Path], dict] | None = None, keep_files: bool = False) -> WorkerJob:
        """Send a job; `prepare(folder)` may write input files into the job's folder and return the params.

        The folder is removed when the job ends (its files were read by `read_item`/`read_result`), unless
        `keep_files`."""
        folder = Path(folder) if folder is not None else Path(
            tempfile.mkdtemp(prefix=f"aacscore-{kind}-", dir=self.temporary_dir))
        if prepare is not None:
            params = prepare(folder)
        self.start()
        job = WorkerJob(self, f"{os.getpid()}-{next(self._ids)}", kind, folder, read_item, read_result)
        job.keep_files, job.process = keep_files, self._process
        with self._lock:
            self._jobs[job.id] = job
        try:
            self._process.stdin.write(encode({"job": job.id, "kind": kind, "folder": str(folder),
                                              "params": params or {}}))
            self._process.stdin.flush()
        except (OSError, ValueError):
            self._end_jobs_of(self._process, "the worker stopped before it took the job")
        return job

    def _cancel(self, job: WorkerJob) -> None:
        process = self._process
        if process is None:
            return
        try:
            process.stdin.write(encode({"cancel": job.id}))
            process.stdin.flush()
        except (OSError, ValueError):
            pass
        timer = threading.Timer(self.cancel_grace, self._kill_if_running, args=(process, job))
        timer.daemon = True
        timer.start()

    def _kill_if_running(self, process: subprocess.Popen, job: WorkerJob) -> None:
        if not job._ended.is_set():
            self._killed_to_cancel = process
            self._kill(process)

    def _kill(self, process: subprocess.Popen) -> None:
        try:
            process.kill()
            process.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def _job_finished(self, job: WorkerJob) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)
        if not job.keep_files:  # what the job wrote was read by then
            shutil.rmtree(job.folder, ignore_errors=True)

    # -- the reader threads

    def _read_stdout(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            message = decode(line)
            if message is None:
                self._log.put(line.rstrip())
                continue
            if message.get("event") == "ready":
                self.ready = message
                if message.get("protocol") != PROTOCOL_VERSION:
                    self._log.put(f"worker protocol {message.get('protocol')}, expected {PROTOCOL_VERSION}")
                continue
            with self._lock:
                job = self._jobs.get(str(message.get("job")))
            if job is not None:
                job._receive(message)
        process.wait()
        self._end_jobs_of(process, None)

    def _read_stderr(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self._stderr.append(line.rstrip())
            self._log.put(line.rstrip())

    def _end_jobs_of(self, process: subprocess.Popen, why: str | None) -> None:
        """The process ended: every job it had ends, cancelled when that was asked, else as an error."""
        code = process.poll()
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.process is process]
        time.sleep(0.05)  # let the stderr reader take the last lines
        tail = "\n".join(self._stderr)
        for job in jobs:
            if job._ended.is_set():
                continue
            if job.is_cancelled():
                job._receive({"job": job.id, "event": "cancelled"})
            else:
                message = why or ("the worker was stopped to cancel another job; run this one again"
                                  if self._killed_to_cancel is process
                                  else f"the worker process ended unexpectedly (exit code {code})")
                job._receive({"job": job.id, "event": "error", "message": message,
                              "details": f"{self.python} -m {SERVER_MODULE}\n{tail}"})
        if self._process is process:
            self._process = None
