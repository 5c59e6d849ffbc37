"""The layers hold at run time too: serving imports none of the trainer's heavy modules.

`make lint` checks the import graph (.importlinter); this checks what a serving process actually
loads, lazy imports included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

# What the trainer and the lifecycle bring in; a process that only serves needs none of it.
TRAINER_MODULES = [
    "ray.train",
    "ray.tune",
    "deepspeed",
    "trl",
    "datasets",
    "jobs.finetune",
    "jobs.parallel",
    "jobs.objectives",
    "jobs.rollout",
    "tune",
]


@pytest.mark.integration  # a fresh interpreter
def test_serving_imports_none_of_the_trainer():
    code = (
        "import json, sys\n"
        "import serve.app, serve.model, serve.__main__\n"
        f"print(json.dumps([m for m in {TRAINER_MODULES!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
