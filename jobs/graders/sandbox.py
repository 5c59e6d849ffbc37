"""The environment a grader's child process gets: no credentials of the trainer's."""

from __future__ import annotations

import os
import re

# Names that carry credentials (OPENAI_API_KEY, HF_TOKEN, WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD,
# GOOGLE_APPLICATION_CREDENTIALS, ...) and every AWS_* setting.
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION|^AWS_", re.IGNORECASE)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _SECRET.search(k)}
    env.update(extra)
    return env
