"""`train.profile_steps: [first, last]`: rank 0's torch profiler trace of those training steps.

    with StepProfiler(cfg, rank, done_steps) as profiler:
        while ...:
            profiler.before(step)          # starts recording at `first`
            ... one optimizer step ...
            profiler.after(step)           # stops after `last`, writes the trace

The trace is Chrome trace JSON named `rank0.steps_FIRST-LAST.pt.trace.json` in the run
directory's `profile/` (local or s3://): Perfetto (ui.perfetto.dev) and chrome://tracing open the
file, TensorBoard's profiler plugin reads the directory. Each step is a `ProfilerStep#N` span.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from core import storage
from jobs.config import JobConfig
from jobs.distributed import print0


class StepProfiler:
    """Records steps `first..last` of `train.profile_steps` on rank 0; does nothing elsewhere.
    A resumed run records the part of the window it runs; a run that stops inside the window
    (a pause, an early stop) writes the steps it recorded; one that fails writes nothing."""

    def __init__(self, cfg: JobConfig, rank: int, device: torch.device):
        self.window = cfg.train.profile_steps if rank == 0 else None
        self.run_dir = storage.join(cfg.checkpoint.storage_path, cfg.run.name)
        self.device = device
        self.prof: torch.profiler.profile | None = None
        self.span: torch.profiler.record_function | None = None
        self.first = self.last = 0  # the steps recorded

    def before(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) runs."""
        if self.window is None:
            return
        first, last = self.window
        if self.prof is None and first <= step <= last:  # or a run resumed inside the window
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
            self.first = step
        if self.prof is not None:
            # the name TensorBoard's profiler plugin splits a trace into steps by
            self.span = torch.profiler.record_function(f"ProfilerStep#{step}")
            self.span.__enter__()

    def after(self, step: int) -> None:
        """Called after optimizer step `step`: its span ends, and the trace after `last`."""
        if self.prof is None:
            return
        self._end_span()
        self.last = step
        if step >= self.window[1]:
            self._finish(write=True)

    def _end_span(self) -> None:
        span, self.span = self.span, None
        if span is not None:
            span.__exit__(None, None, None)

    def _finish(self, write: bool) -> None:
        self._end_span()
        prof, self.prof, self.window = self.prof, None, None  # one trace per run
        prof.stop()
        if write:
            self._write(prof)

    def _write(self, prof: torch.profiler.profile) -> None:
        name = f"rank0.steps_{self.first}-{self.last}.pt.trace.json"
        dest = storage.join(self.run_dir, "profile")
        if storage.is_remote(dest):
            with tempfile.TemporaryDirectory() as tmp:
                prof.export_chrome_trace(str(Path(tmp) / name))
                storage.put_dir(tmp, dest)
        else:
            Path(dest).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(dest) / name))
        print0(f"profiler trace of steps {self.first}-{self.last}: {dest}/{name}")

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.prof is not None:
            self._finish(write=exc_type is None)
