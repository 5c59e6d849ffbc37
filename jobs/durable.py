"""Getting checkpoints to storage when storage and nodes fail: uploads that wait out an outage,
and a checkpoint on SIGTERM (a spot node's shutdown).

Ray Train copies a reported checkpoint with one try-and-fail-the-run upload (ray#47939). Here a
rank stages its part on local disk, hands it to Ray's background upload thread
(`CheckpointUploadMode.ASYNC`) with `upload_checkpoint` as the upload function, and trains on:
the upload retries with backoff until storage answers, the commit marker goes last, and Ray
registers the checkpoint only when every rank's upload has returned. Training waits only when
too many staged checkpoints pile up on local disk.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

# a rank's commit marker (jobs.checkpointing writes and reads it); uploaded after every other file
MARKER = re.compile(r"COMMIT_rank(\d+)_of(\d+)\.json")


class Uploader:
    """One per worker: staging directories, the retrying upload, the bound on what waits."""

    def __init__(self, storage: tuple, retry_s: float, max_pending: int, log=print):
        self.fs, self.root = storage  # the run's directory: (pyarrow filesystem, path)
        self.retry_s, self.max_pending, self.log = retry_s, max_pending, log
        self.staged: set[str] = set()  # local directories not yet uploaded
        self.saved: list[str] = []  # checkpoint names uploaded, in order; read by the loop
        self._cond = threading.Condition()

    def stage(self) -> Path:
        """A local directory for the next checkpoint, once the ones before leave room for it."""
        with self._cond:
            if len(self.staged) >= self.max_pending:
                self.log(
                    f"{len(self.staged)} checkpoints wait for upload (checkpoint.max_pending_uploads): "
                    "training waits for storage"
                )
            self._cond.wait_for(lambda: len(self.staged) < self.max_pending)
            path = os.path.realpath(tempfile.mkdtemp(prefix="rayft-ckpt-"))
            self.staged.add(path)
        return Path(path)

    def unstage(self, staged: Path) -> None:
        """A staged checkpoint that will not be uploaded (its report failed)."""
        self._done(str(staged))

    def _done(self, path: str) -> None:
        # Ray may call the upload function again after it failed: only the first call counts
        path = os.path.realpath(path)
        shutil.rmtree(path, ignore_errors=True)
        with self._cond:
            self.staged.discard(path)
            self._cond.notify_all()

    def upload(self, checkpoint, dir_name: str):
        """Ray's `checkpoint_upload_fn`: copy the files, then the marker; retry until storage
        answers or `retry_s` has passed, then fail (the run restarts from the last complete one)."""
        import ray.train

        dest = f"{self.root}/{dir_name}"
        try:
            upload_with_retry(Path(checkpoint.path), self.fs, dest, self.retry_s, self.log)
        finally:
            self._done(checkpoint.path)
        self.saved.append(dir_name)
        return ray.train.Checkpoint(path=dest, filesystem=self.fs)


def upload_with_retry(local: Path, fs, dest: str, retry_s: float, log=print) -> None:
    """Copy a checkpoint directory to (pyarrow fs, dest), commit markers last."""
    delay, deadline, attempt = 1.0, time.monotonic() + retry_s, 0
    while True:
        attempt += 1
        try:
            copy_committed(local, fs, dest)
            if attempt > 1:
                log(f"checkpoint {dest} uploaded after {attempt} attempts")
            return
        except OSError as e:  # pyarrow's errors for a refused connection, a 5xx, a full disk
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"checkpoint {dest}: upload failed for {retry_s:.0f} s "
                    f"(checkpoint.upload_retry_s), giving up: {e}"
                ) from e
            log(
                f"checkpoint {dest}: upload attempt {attempt} failed ({e}); retrying in {delay:.0f} s"
            )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def copy_committed(local: Path, fs, dest: str) -> None:
    import pyarrow.fs

    files = sorted(p for p in local.rglob("*") if p.is_file())
    # the marker says "every file above is there": it must be the last thing to land
    files.sort(key=lambda p: bool(MARKER.fullmatch(p.name)))
    source = pyarrow.fs.LocalFileSystem()
    for f in files:
        target = f"{dest}/{f.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(
            str(f), target, source_filesystem=source, destination_filesystem=fs, use_threads=False
        )


# ------------------------------------------------------------------------ preemption

_sigterm = threading.Event()
_previous_handler = None


def _install(_actor=None) -> None:
    """Runs on the worker actor's main thread, the only one allowed to set a signal handler."""
    global _previous_handler
    if _previous_handler is None:
        _previous_handler = signal.getsignal(signal.SIGTERM)
    _sigterm.clear()
    signal.signal(signal.SIGTERM, lambda signum, frame: _sigterm.set())


def _restore(_actor=None) -> None:
    if _previous_handler is not None:
        signal.signal(signal.SIGTERM, _previous_handler)


class Preemption:
    """SIGTERM on a worker (a spot node shutting down) becomes 'checkpoint now, then exit'.

    The handler only sets a flag; each step the ranks agree on it (one all-reduce), all save a
    checkpoint, and the signalled ranks then exit as Ray's own handler would have made them."""

    def __init__(self, enabled: bool):
        import ray

        self.enabled = enabled and ray.get_runtime_context().current_actor is not None
        if self.enabled:
            actor = ray.get_runtime_context().current_actor
            ray.get(actor.__ray_call__.remote(_install))

    def requested(self, world: int) -> bool:
        if not self.enabled:
            return False
        if world == 1:
            return _sigterm.is_set()
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if _sigterm.is_set() else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit_if_signalled(self) -> None:
        """After the checkpoint: hand SIGTERM back to Ray's handler and deliver it again."""
        if self.enabled and _sigterm.is_set():
            self.close()
            os.kill(os.getpid(), signal.SIGTERM)

    def close(self) -> None:
        if self.enabled:
            import ray

            ray.get(ray.get_runtime_context().current_actor.__ray_call__.remote(_restore))
            self.enabled = False
