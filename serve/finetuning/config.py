"""Typed settings of the fine-tuning API (the `finetuning:` section of the serving app's args)
and the request body of `POST /v1/fine_tuning/jobs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO = Path(__file__).resolve().parents[2]
Auto = Literal["auto"]


def absolute(path: str) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((REPO / path).resolve())


class BaseModelEntry(BaseModel):
    """A base model tenants may fine-tune: the job config its jobs start from."""

    model_config = ConfigDict(extra="forbid")

    # A job YAML (configs/quickstart.yaml-like): every field the API does not set comes from it.
    job: str = Field(min_length=1)
    # Overrides applied to that YAML (dotted keys), e.g. {"model.name_or_path": ".cache/tiny-llama"}.
    overrides: dict[str, Any] = {}
    # An eval YAML (tune/evaluate.py) whose gate decides promotion; None: the built-in gate (the
    # adapter's held-out loss must beat the base's on the run's own held-out split).
    eval: str | None = None


class TenantLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrent_jobs: int = Field(2, ge=1)  # validating_files, queued, running or paused
    max_file_bytes: int = Field(50_000_000, ge=1)
    max_total_bytes: int = Field(500_000_000, ge=1)  # every file the tenant holds, results too


class FinetuningSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Jobs, files and events: any SQLAlchemy URL (postgresql+psycopg://... for a shared
    # deployment); SQLite by default, one file. The Ray jobs write their events into it too.
    database_url: str = "sqlite:///runs/finetuning/state.db"
    files: str = "runs/finetuning/files"  # file bytes: a local directory or s3://bucket/prefix
    runs: str = "runs/finetuning/runs"  # the jobs' checkpoints and run directories (or s3://)
    # The Ray cluster's dashboard (Ray Jobs API); None: RAY_ADDRESS's, else http://127.0.0.1:8265.
    ray_address: str | None = None
    # The runner's interpreter on the cluster and what its Ray job runs with (working_dir,
    # env_vars, pip ...). Default: this checkout on PYTHONPATH (the cluster shares this disk).
    python: str = "python"
    runtime_env: dict[str, Any] | None = None
    base_models: dict[str, BaseModelEntry] = Field(min_length=1)
    limits: TenantLimits = TenantLimits()
    tenant_limits: dict[str, TenantLimits] = {}  # per tenant name, instead of `limits`
    reconcile_every_s: float = Field(5.0, gt=0)
    # Live progress: how often the runner looks for new checkpoints while training.
    progress_every_s: float = Field(2.0, gt=0)

    @field_validator("base_models")
    @classmethod
    def _names(cls, value: dict[str, BaseModelEntry]) -> dict[str, BaseModelEntry]:
        bad = [n for n in value if ":" in n or not n or len(n) > 64]
        if bad:
            raise ValueError(f"base_models: invalid names {bad} (no ':', at most 64 characters)")
        return value

    @model_validator(mode="after")
    def _absolute(self) -> FinetuningSettings:
        # Relative paths are the checkout's: the app may be built in a Ray task whose working
        # directory is not the one `serve run` started in, and the Ray jobs run elsewhere again.
        for field in ("files", "runs"):
            setattr(self, field, absolute(getattr(self, field)))
        if self.database_url.startswith("sqlite:///") and self.database_url != "sqlite:///:memory:":
            self.database_url = "sqlite:///" + absolute(
                self.database_url.removeprefix("sqlite:///")
            )
        return self

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.get(tenant, self.limits)

    def resolved_runtime_env(self) -> dict[str, Any]:
        if self.runtime_env is not None:
            return self.runtime_env
        return {"env_vars": {"PYTHONPATH": str(REPO)}}


# ------------------------------------------------------------------ POST /v1/fine_tuning/jobs


class Strict(BaseModel):
    # A field we do not know is a 400 naming it, never silently ignored.
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(Strict):
    n_epochs: Auto | int = Field("auto", description="epochs over the training file")
    batch_size: Auto | int = "auto"
    learning_rate_multiplier: Auto | float = "auto"

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive_int(cls, v):
        if v != "auto" and not (1 <= v <= 256):
            raise ValueError("must be 'auto' or an integer from 1 to 256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and not (0 < v <= 100):
            raise ValueError("must be 'auto' or a number in (0, 100]")
        return v


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Auto | float = "auto"

    @field_validator("beta")
    @classmethod
    def _beta(cls, v):
        if v != "auto" and not (0 < v <= 2):
            raise ValueError("must be 'auto' or a number in (0, 2]")
        return v


class ReinforcementHyperparameters(SupervisedHyperparameters):
    """OpenAI's reinforcement hyperparameters. batch_size counts prompts (each sampled
    train.grpo.num_generations times); eval_interval is steps between held-out evaluations."""

    eval_interval: Auto | int = "auto"
    # One greedy completion per held-out prompt is what we evaluate; OpenAI's knobs of its own
    # sampling and reasoning models are refused rather than ignored.
    eval_samples: Auto | Literal[1] = "auto"
    compute_multiplier: Auto = "auto"
    reasoning_effort: Auto | Literal["default"] = "auto"

    @field_validator("eval_interval")
    @classmethod
    def _interval(cls, v):
        if v != "auto" and not (1 <= v <= 10_000):
            raise ValueError("must be 'auto' or an integer from 1 to 10000")
        return v


class ReinforcementMethod(Strict):
    grader: dict[str, Any]  # OpenAI's grader shapes (jobs/graders), validated with the job config
    hyperparameters: ReinforcementHyperparameters = ReinforcementHyperparameters()


class SupervisedMethod(Strict):
    hyperparameters: SupervisedHyperparameters = SupervisedHyperparameters()


class DpoMethod(Strict):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class Method(Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None


class RayftExtension(Strict):
    """Our own knobs, under the body key `rayft` (openai client: extra_body={"rayft": {...}})."""

    lora_rank: int | None = Field(None, ge=1, le=256)
    lora_alpha: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps
    checkpoint_every_steps: int | None = Field(None, ge=1)
    eval_every_steps: int | None = Field(None, ge=1)
    gate: bool = True  # false: promote without the evaluation gate (recorded as forced)


class JobRequest(Strict):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    # Deprecated by OpenAI in favour of method.supervised.hyperparameters; accepted the same.
    hyperparameters: SupervisedHyperparameters | None = None
    integrations: list[dict[str, Any]] | None = None
    rayft: RayftExtension = RayftExtension()

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (
            len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())
        ):
            raise ValueError("at most 16 keys of up to 64 characters, values up to 512")
        return v
