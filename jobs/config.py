"""Typed job configuration: one YAML file per job, dotted overrides from the command line.

Everything is validated when loaded, before Ray or any worker starts; an error names the file and
the dotted field, and suggests the closest known key for a misspelling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from core.config import (
    Section,
    apply_overrides,
    parse_overrides,
    read_yaml,
    validate,
)
from core.upstream import require
from inference.config import ModelConfig
from jobs.graders.config import GraderConfig


class RunConfig(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 42
    # Checkpoint and stop once this many steps are done (a time-boxed slice of a longer run);
    # running the same run.name again without it continues where it stopped.
    stop_after_steps: int | None = Field(None, ge=1)


FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]


class SourceConfig(Section):
    # A file, a glob, a directory, an s3:// URI, or a `datasets` dataset saved with save_to_disk.
    # Files: .jsonl/.json/.parquet/.csv (.jsonl.gz etc. through fsspec's compression).
    path: str = Field(min_length=1)
    format: Format = "auto"
    # Our field name -> this source's column, for odd exports: {messages: dialog, completion: answer}
    fields: dict[str, str] = {}
    # Mixing: each kept training row of this source appears `weight` times on average (0.5: a
    # stable half of them, 2: twice); eval and test rows are never repeated.
    weight: float = Field(1.0, gt=0, le=100)
    split: Literal["auto", "train", "eval", "test"] = "auto"  # auto: the hash-based split


class NormalizeConfig(Section):
    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    whitespace: bool = True  # \r\n -> \n, trailing spaces, runs of 3+ blank lines, outer space


class DedupConfig(Section):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard similarity of the shingle sets
    num_perm: int = Field(128, ge=16, le=1024)
    # Word 3-grams: ~7x fewer shingles than character 5-grams on chat rows (measured in
    # benchmarks/prepare_bench.py); `char` suits very short rows or languages without spaces.
    shingle: Literal["char", "word"] = "word"
    shingle_size: int = Field(3, ge=1, le=32)


class LengthConfig(Section):
    # Tokens of the rendered example (chat template included) with the job's tokenizer.
    min_tokens: int = Field(50, ge=0)
    max_tokens: int = Field(4096, ge=1)


class JudgeConfig(Section):
    base_url: str = Field(min_length=1)  # any OpenAI-compatible endpoint, e.g. http://host:8000/v1
    model: str = Field(min_length=1)
    api_key_env: str | None = "OPENAI_API_KEY"  # the variable's name: keys never go in a config
    rubric: str | None = None  # None: the built-in rubric (helpful, correct, well-formed; 1-10)
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60, gt=0)


class QualityConfig(Section):
    scorer: Literal["none", "heuristic", "judge"] = "heuristic"
    min_score: float | None = Field(0.5, ge=0, le=1)  # scores are in [0, 1]
    drop_bottom_fraction: float = Field(0.0, ge=0, lt=1)  # of the rows left after the other filters
    judge: JudgeConfig | None = None


class DataConfig(Section):
    # Where rows come from: `sources` in full, or the train_files/eval_files shorthand, or a set
    # already written by `python -m jobs.prepare` (`prepared`).
    sources: list[SourceConfig] = []
    train_files: list[str] = []
    eval_files: list[str] = []
    prepared: str | None = None
    format: Format = "auto"  # the default for sources that do not say
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # hash split of the rows with split: auto
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_seq_len: int = Field(1024, ge=8)  # training truncates longer examples to this
    on_error: Literal["skip", "fail"] = "skip"
    system_prompt: str | None = None  # prepended when a row has no system message
    normalize: NormalizeConfig = NormalizeConfig()
    dedup: DedupConfig = DedupConfig()
    length: LengthConfig = LengthConfig()
    quality: QualityConfig = QualityConfig()

    @field_validator("train_files", "eval_files", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _prepared_wins(cls, raw: Any) -> Any:
        # `data.prepared=PATH` on the command line replaces the config's own files
        if isinstance(raw, dict) and raw.get("prepared"):
            raw = {
                k: v for k, v in raw.items() if k not in ("sources", "train_files", "eval_files")
            }
        return raw

    @model_validator(mode="after")
    def _one_origin(self) -> DataConfig:
        given = [n for n in ("sources", "train_files", "prepared") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of data.sources, data.train_files or data.prepared"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        if self.eval_files and not self.train_files:
            raise ValueError(
                "data.eval_files goes with data.train_files (in data.sources use split: eval)"
            )
        if self.length.min_tokens > self.length.max_tokens:
            raise ValueError("data.length.min_tokens is above data.length.max_tokens")
        if self.quality.scorer == "judge" and self.quality.judge is None:
            raise ValueError("data.quality.scorer: judge needs a data.quality.judge section")
        if self.eval_fraction + self.test_fraction >= 1:
            raise ValueError("data.eval_fraction + data.test_fraction must stay below 1")
        return self

    def all_sources(self) -> list[SourceConfig]:
        """The sources in full form (the shorthand expanded)."""
        if self.sources:
            return [
                s if s.format != "auto" else s.model_copy(update={"format": self.format})
                for s in self.sources
            ]
        split = "train" if self.eval_files else "auto"
        return [SourceConfig(path=p, format=self.format, split=split) for p in self.train_files] + [
            SourceConfig(path=p, format=self.format, split="eval") for p in self.eval_files
        ]

    def has_eval_source(self) -> bool:
        return any(s.split == "eval" for s in self.all_sources())


class LoraConfig(Section):
    # Defaults from published findings: every linear layer adapted (QLoRA, Dettmers et al. 2023:
    # needed to match full fine-tuning; then the rank matters little), alpha = 2r (Biderman et al.
    # 2024, "LoRA Learns Less and Forgets Less").
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r (stable at high rank)
    use_dora: bool = False  # weight-decomposed LoRA; the serving app does not serve DoRA yet
    # A peft adapter directory to start from (e.g. an SFT warm start before GRPO): its weights,
    # and its r/alpha/target_modules, which must match the ones above
    init_from: str | None = None


class FsdpConfig(Section):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per decoder layer plus the root."""

    # full: params, grads and optimizer state sharded (ZeRO-3 like); grad_op: params gathered
    # after forward and kept for backward (ZeRO-2 like); hybrid: full inside a node, replicated
    # across nodes (needs a multiple of `gpus_per_node` workers)
    sharding: Literal["full", "grad_op", "hybrid"] = "full"
    cpu_offload: bool = False  # params and grads live in CPU memory between uses
    # Parameters are gathered in this dtype for compute, gradients reduced in reduce_dtype;
    # auto = bf16 on CUDA with bf16 support, else fp32 (no mixed precision on CPU).
    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    reduce_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # hybrid sharding's node size; None: the GPUs per node Ray reports (or every worker on CPU)
    shard_group_size: int | None = Field(None, ge=1)


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO; the DeepSpeed JSON is generated from the job config."""

    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer state (and its step) on the CPU
    offload_params: bool = False  # stage 3 only: parameters on the CPU between uses
    # A DeepSpeed JSON of your own, merged over the generated one (yours wins, except batch
    # sizes, which must agree with train.*; a conflict is an error naming the key).
    config: str | None = None


class DpoConfig(Section):
    """Preference tuning (train.method: dpo); the loss is TRL's DPOTrainer code (jobs/objectives/dpo.py)."""

    beta: float = Field(0.1, gt=0)
    # TRL's names: sigmoid (DPO), ipo, hinge, robust (DPO under label noise: label_smoothing)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust only: the share of flipped labels

    @model_validator(mode="after")
    def _smoothing_needs_robust(self) -> DpoConfig:
        if self.label_smoothing and self.loss_type != "robust":
            # TRL 1.x ignores it for the other losses: refused rather than silently dropped
            raise ValueError(
                f"label_smoothing is used by loss_type: robust only (got {self.loss_type})"
            )
        return self


class RolloutConfig(Section):
    """GRPO's rollout actors (jobs/rollout.py): Ray actors that hold the base model once each and
    sample the groups with the adapter the trainer publishes after every optimizer step."""

    engine: Literal["hf", "vllm"] = "hf"  # serve/'s engines: transformers, or vLLM's offline LLM
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1, ge=0)
    gpus_per_actor: float = Field(0, ge=0)
    resources_per_actor: dict[str, float] = {}
    # torch threads in each actor; None: max(1, cpus_per_actor). On a laptop, where sampling and
    # training take turns (async_steps 0), the actor may use every core while the trainer waits.
    threads: int | None = Field(None, ge=1)
    # A placement group of its own, apart from the Train workers' (PACK: as few nodes as can
    # hold the actors; SPREAD: one per node where it can)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    placement_timeout_s: float = Field(300, gt=0)
    # 0: on-policy, every batch sampled with the weights of the step before; 1: the next batch is
    # sampled while this one trains, one version behind, with the importance ratio against the
    # version that produced it
    async_steps: Literal[0, 1] = 0
    max_restarts: int = Field(-1, ge=-1)  # a lost actor is restarted (and its calls retried)
    vllm_engine_kwargs: dict[str, Any] = {}  # engine: vllm, passed to vllm.LLM


class GrpoConfig(Section):
    """Reinforcement fine-tuning (train.method: grpo). Names and defaults as TRL's GRPOConfig;
    the loss is TRL's own code (jobs/objectives/grpo.py). For grpo, train.micro_batch_size and
    train.effective_batch_size count prompts: each prompt's group of num_generations completions
    stays in one micro-batch."""

    grader: GraderConfig  # OpenAI's grader shapes (jobs/graders): string_check, python, multi...
    num_generations: int = Field(4, ge=2)  # the group: completions per prompt
    max_completion_length: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0)  # KL to the reference: the base with the adapter switched off
    use_bias_correction_kl: bool = True  # TRL's default: the KL term weighted by the ratio
    epsilon: float = Field(0.2, gt=0)  # the ratio's clip range, low side
    epsilon_high: float | None = Field(None, gt=0)  # high side (DAPO's clip-higher); None: epsilon
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # held-out prompts: one greedy completion each, scored by the same grader at every eval
    eval_temperature: float = Field(0.0, ge=0)


class TrainConfig(Section):
    # ddp: every worker holds the whole model; fsdp / deepspeed: shard it (see fsdp / deepspeed)
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    # dpo: prompt/chosen/rejected pairs; grpo: prompts (+ fields the grader reads) and a grader
    method: Literal["sft", "dpo", "grpo"] = "sft"
    fsdp: FsdpConfig = FsdpConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    dpo: DpoConfig = DpoConfig()
    grpo: GrpoConfig | None = None  # train.method: grpo
    # Recompute each decoder layer's activations in backward: memory for ~30% more compute.
    gradient_checkpointing: bool = True
    # Keep what the backward needs from the forward in CPU memory (pinned) until the backward
    # uses it: GPU memory for host transfers. On a CPU device it saves nothing (jobs/model.py).
    activation_offloading: bool = False
    # Several examples per sequence of data.max_seq_len tokens, attention kept inside each one.
    packing: bool = False
    # LoRA's best learning rate is ~10x full fine-tuning's and nearly rank-independent, and LoRA
    # tolerates large batches less well ("LoRA Without Regret", Schulman et al. 2025): 2e-4 and a
    # modest effective batch of 16
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    micro_batch_size: int = Field(4, ge=1)  # per worker, per forward pass
    effective_batch_size: int = Field(16, ge=1)  # across all workers and accumulation steps
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast; auto = bf16 on CUDA
    log_every_steps: int = Field(10, ge=1)
    # [first, last] (1-based, inclusive): rank 0 writes a torch profiler trace of these steps to
    # the run directory's profile/ (Perfetto, chrome://tracing and TensorBoard read it)
    profile_steps: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _profile_window(self) -> TrainConfig:
        if self.profile_steps is None:
            return self
        first, last = self.profile_steps
        if not 1 <= first <= last:
            raise ValueError(
                f"train.profile_steps: [{first}, {last}] must be [first, last] steps with "
                "1 <= first <= last"
            )
        if self.max_steps and last > self.max_steps:
            raise ValueError(
                f"train.profile_steps: step {last} is past the run's train.max_steps "
                f"({self.max_steps})"
            )
        return self


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1)
    # true: the job trains in the process that runs it (Ray Train's local mode): no worker
    # processes to start (a 30-step job: 5.7 s instead of 26 s on 2 CPUs), a debugger stops in the
    # training loop. One worker, train.strategy ddp, no restarts; checkpoints, resume and
    # checkpoint.keep_last work as on workers.
    local: bool = False
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    # Extra Ray resources a worker needs, e.g. {"accelerator_type:A10G": 0.01} or {"spot": 1}.
    resources_per_worker: dict[str, float] = {}
    # Worker-group failures (a lost node, a killed worker) survived by restarting the workers from
    # the newest checkpoint; -1 retries forever. Ray Train's FailureConfig(max_failures).
    max_failures: int = Field(0, ge=-1)
    # The memory plan (jobs/memory.py) checks the job against the workers' memory before they
    # start: refuse (default) | warn (print the refusal, start anyway) | off
    memory_check: Literal["refuse", "warn", "off"] = "refuse"
    gpu_memory_gib: float | None = Field(
        None, gt=0
    )  # per GPU; None: by the node's accelerator type
    # PACK: workers on as few nodes as possible; SPREAD: one per node where it can
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


def _local_or_s3(v: str) -> str:
    if "://" in v and not v.startswith("s3://"):
        raise ValueError(f"{v}: give a local directory or s3://bucket/prefix")
    return v


StoragePath = Annotated[str, AfterValidator(_local_or_s3)]  # a job's or a sweep's storage


class CheckpointConfig(Section):
    # a run lives in STORAGE_PATH/RUN_NAME: a local directory or s3://bucket/prefix (endpoint
    # from AWS_ENDPOINT_URL for MinIO/R2/GCS interop)
    storage_path: StoragePath = "runs"
    every_steps: int | None = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    # while storage is down, an upload is retried (with backoff) this long before the run fails;
    # training goes on meanwhile, with at most max_pending_uploads checkpoints staged on local disk
    upload_retry_s: float = Field(1800, gt=0)
    max_pending_uploads: int = Field(3, ge=1)
    save_on_sigterm: bool = True  # a spot node's shutdown: checkpoint now, then exit


class EvalConfig(Section):
    every_steps: int | None = Field(None, ge=1)  # None: only at the end
    early_stopping_patience: int | None = Field(None, ge=1)  # evals without improvement
    batch_size: int = Field(8, ge=1)
    task_metric: Literal["exact_match", "none"] = "exact_match"
    max_generate_samples: int = Field(
        64, ge=0
    )  # held-out rows used for the generated-answer metric
    max_new_tokens: int = Field(32, ge=1)


class TrackingConfig(Section):
    """Experiment tracking from rank 0. Credentials come from the environment (WANDB_API_KEY,
    MLFLOW_TRACKING_TOKEN, ...), never from this file."""

    backend: Literal["none", "wandb", "mlflow"] = "none"
    project: str = "rayft"  # wandb project / MLflow experiment name
    entity: str | None = None  # wandb team or user
    # wandb: online | offline (WANDB_MODE wins when set); MLflow: tracking URI (a local
    # directory for a file store, http://host:5000 for a server); None: the library's default
    mode: Literal["online", "offline"] = "online"
    tracking_uri: str | None = None
    tags: dict[str, str] = {}
    # A tracker that cannot start (no network, bad URI, no credentials) warns and the run goes on
    # untracked; true fails the job before its first step instead.
    required: bool = False


class JobConfig(Section):
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig | None = LoraConfig()  # null: full fine-tune of every weight
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    rollout: RolloutConfig = RolloutConfig()  # train.method: grpo

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        per_pass = self.train.micro_batch_size * self.scaling.num_workers
        if self.train.effective_batch_size % per_pass:
            raise ValueError(
                f"train.effective_batch_size ({self.train.effective_batch_size}) must be a multiple of "
                f"train.micro_batch_size x scaling.num_workers ({self.train.micro_batch_size} x "
                f"{self.scaling.num_workers} = {per_pass})"
            )
        if (
            not self.data.prepared
            and not self.data.has_eval_source()
            and self.data.eval_fraction == 0
        ):
            raise ValueError(
                "data: no held-out set: give eval files (split: eval) or a data.eval_fraction above 0"
            )
        if self.eval.early_stopping_patience and not self.eval.every_steps:
            raise ValueError("eval.early_stopping_patience needs eval.every_steps")
        sc = self.scaling
        if sc.local and (sc.num_workers != 1 or self.train.strategy != "ddp" or sc.max_failures):
            raise ValueError(
                "scaling.local: a job in this process has scaling.num_workers: 1, train.strategy: "
                f"ddp and scaling.max_failures: 0 (got {sc.num_workers}, {self.train.strategy}, "
                f"{sc.max_failures}); remove scaling.local to train on Ray Train workers"
            )
        if self.model.quantization and self.lora is None:
            raise ValueError(
                "model.quantization (QLoRA) trains a LoRA adapter: give a lora section"
            )
        if self.model.quantization and not self.scaling.use_gpu:
            raise ValueError(
                "model.quantization: QLoRA's 4-bit kernels (bitsandbytes) need CUDA; set "
                "scaling.use_gpu: true on a GPU cluster, or drop model.quantization to train "
                "plain LoRA on CPU"
            )
        if self.model.quantization and self.train.strategy != "ddp":
            raise ValueError(
                "model.quantization: QLoRA runs with train.strategy: ddp (4-bit weights are not "
                "sharded by fsdp/deepspeed here); use plain LoRA with fsdp or deepspeed instead"
            )
        if self.model.liger_kernel and not self.scaling.use_gpu:
            raise ValueError(
                "model.liger_kernel: Liger's Triton kernels need scaling.use_gpu: true"
            )
        ds = self.train.deepspeed
        if self.train.strategy == "deepspeed" and ds.offload_params and ds.stage != 3:
            raise ValueError("train.deepspeed.offload_params needs train.deepspeed.stage: 3")
        if self.train.method == "dpo":
            self._check_dpo()
        if self.train.method == "grpo":
            self._check_grpo()
        elif self.train.grpo is not None:
            raise ValueError("train.grpo is read by train.method: grpo only")
        if self.model.attn_implementation == "flash_attention_2" and not self.scaling.use_gpu:
            raise ValueError(
                "model.attn_implementation: flash_attention_2 needs scaling.use_gpu: true"
            )
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("train.precision: fp16 needs scaling.use_gpu: true")
        return self

    @model_validator(mode="after")
    def _supported_upstream(self) -> JobConfig:
        # The private upstream APIs this job will reach (core/upstream/): a version outside their
        # bounds fails here, naming the field that needs the library, before any worker starts.
        if self.train.method in ("dpo", "grpo"):
            require("trl", why=f"train.method: {self.train.method}")
        if self.train.strategy == "deepspeed":
            require("deepspeed", why="train.strategy: deepspeed")
        if self.train.method == "sft" and not self.data.prepared and self.data.dedup.near:
            # an SFT job prepares its data now (jobs/data/prepare.py); dpo/grpo do not dedup
            require("datasketch", why="data.dedup.near: true")
        return self

    def _check_dpo(self) -> None:
        if self.lora is None:
            # the reference is the base with the adapter switched off; a full fine-tune would
            # need a second, frozen copy of the model, which the recipe does not hold
            raise ValueError(
                "train.method: dpo trains a LoRA adapter (the reference model is the base with the "
                "adapter disabled); lora: null (full fine-tune) would need a frozen reference copy, "
                "which is not supported: give a lora section"
            )
        if self.train.packing:
            raise ValueError("train.packing: not supported with train.method: dpo; set it false")
        if self.data.prepared:
            raise ValueError(
                "data.prepared: a prepared set holds SFT conversations; train.method: dpo reads "
                "prompt/chosen/rejected rows from data.train_files or data.sources"
            )

    def _check_grpo(self) -> None:
        if self.train.grpo is None:
            raise ValueError("train.method: grpo needs a train.grpo section with a grader")
        if self.lora is None:
            # rollout actors receive the adapter after every step: a full model would not ship
            raise ValueError(
                "train.method: grpo trains a LoRA adapter (the rollout actors receive its weights "
                "after every step; the reference is the base with the adapter disabled): give a "
                "lora section"
            )
        if self.train.packing:
            raise ValueError("train.packing: not supported with train.method: grpo; set it false")
        if self.rollout.async_steps and self.scaling.num_workers > 1:
            # rank 0 submits the next batch ahead of time, and it knows only its own share
            raise ValueError(
                "rollout.async_steps: 1 runs with scaling.num_workers: 1 (synchronous rollouts "
                "work with several workers)"
            )
        if self.data.prepared:
            raise ValueError(
                "data.prepared: a prepared set holds SFT conversations; train.method: grpo reads "
                "prompt rows from data.train_files or data.sources"
            )

    @property
    def grad_accum_steps(self) -> int:
        return self.train.effective_batch_size // (
            self.train.micro_batch_size * self.scaling.num_workers
        )


def validate_config(raw: dict[str, Any], source: str = "<config>") -> JobConfig:
    return validate(JobConfig, raw, source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply `key.sub=value` overrides and validate everything."""
    raw = apply_overrides(read_yaml(path), parse_overrides(overrides or []))
    return validate_config(raw, str(path))
