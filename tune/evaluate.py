"""Evaluate an adapter (or the base) on task evals, against baselines, and gate it.

    python -m tune.evaluate runs/quickstart-TIMESTAMP configs/eval_reviews.yaml   # a run directory
    python -m tune.evaluate path/to/adapter configs/eval_reviews.yaml --base .cache/tiny-llama

For each task: the base model zero-shot, the base model few-shot (k training examples as earlier
turns of the conversation), and base + adapter, on the same held-out rows. A guard set of
general prompts measures forgetting (reference-answer loss, base vs adapter). The gate passes
when the adapter beats the best baseline by `gate.margin` on `gate.metric` and the guard loss
rises by no more than `gate.guard_tolerance`. Everything is written to RUN/eval.json.

Replies (answer metrics, judge inputs, kept samples) come from inference/generate.py's greedy
generation (transformers; the loop the hf engine serves with) unless the config sets
`engine: vllm` (vLLM's offline engine, the adapter as a LoRARequest); losses always come from
transformers.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer
from pydantic import Field, field_validator, model_validator

from core import cli
from core.config import ConfigError, Section, read_yaml, validate
from core.storage import exists as url_exists
from core.storage import local_copy, open_url
from inference.config import ModelConfig
from inference.generate import chat_prompt_ids, greedy_generate, stop_token_ids
from inference.model import load_base_model, load_tokenizer, resolve_model_path
from inference.runtime import Runtime
from inference.vllm import vllm_installed
from jobs.config import DataConfig, JudgeConfig
from jobs.data.prepare import prepare_data
from jobs.data.render import prompt_and_answer
from jobs.evaluation import eval_loss, perplexity

METRICS = ("loss", "perplexity", "exact_match", "accuracy", "f1", "contains", "regex", "judge")
LOWER_IS_BETTER = {"loss", "perplexity"}
CPU = Runtime(torch.device("cpu"))  # the models are loaded on the CPU, in their own dtype


class TaskConfig(Section):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    # The rows: a data section like a job's (its held-out split is the task's test set); `null`
    # with a run directory means that run's own data section and seed.
    data: DataConfig | None = None
    metrics: list[
        Literal["loss", "perplexity", "exact_match", "accuracy", "f1", "contains", "regex", "judge"]
    ] = ["loss", "exact_match"]
    labels: list[str] = []  # for accuracy/f1: the first label found in a reply is its prediction
    regex: str | None = None  # for regex: the share of replies that match
    judge: JudgeConfig | None = None  # for judge: an OpenAI-compatible endpoint grades replies
    max_samples: int = Field(200, ge=1)
    few_shot: int = Field(3, ge=0)  # 0: no few-shot baseline
    max_new_tokens: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> TaskConfig:
        if {"accuracy", "f1"} & set(self.metrics) and not self.labels:
            raise ValueError(f"tasks.{self.name}: accuracy/f1 need labels")
        if "regex" in self.metrics and not self.regex:
            raise ValueError(f"tasks.{self.name}: the regex metric needs regex")
        if "judge" in self.metrics and not self.judge:
            raise ValueError(f"tasks.{self.name}: the judge metric needs a judge section")
        return self


class GateConfig(Section):
    metric: str  # TASK.METRIC, e.g. sentiment.exact_match
    margin: float = 0.0  # the adapter must beat the best baseline by this much (absolute)
    guard_tolerance: float = Field(0.1, ge=0)  # guard loss may rise by this fraction at most


class EvalSuiteConfig(Section):
    """An evaluation suite (tune.evaluate's YAML): tasks, a guard, a gate. Not the job's own
    periodic held-out evaluation, which is jobs/config.py's EvalConfig."""

    base_model: str | None = None  # default: the run's base model
    tasks: list[TaskConfig] = Field(min_length=1)
    guard: DataConfig | None = None  # general prompts with reference answers (forgetting)
    gate: GateConfig | None = None
    batch_size: int = Field(16, ge=1)
    # The adapter's replies to a task's first rows kept in eval.json, with their prompts: what a
    # reader checks by eye, and what the pipeline's canary replays against the live endpoint.
    keep_samples: int = Field(5, ge=0)
    # Who writes the replies: inference/generate.py's greedy decoding (the default: no extra install, the model
    # that computes the losses, and the engine serve/ answers with, whose replies the pipeline's
    # canary must match) or vLLM's offline engine (faster on a GPU, and the engine where the
    # adapter is served on vLLM). `engine_args` go to vllm.LLM as they are, e.g.
    # {max_model_len: 4096, gpu_memory_utilization: 0.5, enforce_eager: true}.
    engine: Literal["transformers", "vllm"] = "transformers"
    engine_args: dict[str, Any] = {}

    @field_validator("engine")
    @classmethod
    def _engine_installed(cls, engine: str) -> str:
        if engine == "vllm" and not vllm_installed():
            raise ValueError(
                "vllm is not importable here: install it (pip install vllm) or set "
                "engine: transformers"
            )
        return engine

    @model_validator(mode="after")
    def _engine_args_need_vllm(self) -> EvalSuiteConfig:
        if self.engine_args and self.engine != "vllm":
            raise ValueError("engine_args are vllm.LLM arguments: set engine: vllm, or drop them")
        return self

    @model_validator(mode="after")
    def _gate_metric_exists(self) -> EvalSuiteConfig:
        if self.gate:
            task, _, metric = self.gate.metric.partition(".")
            names = {t.name: t for t in self.tasks}
            if task not in names or metric not in names[task].metrics:
                raise ValueError(
                    f"gate.metric {self.gate.metric!r} is not a task.metric measured here"
                )
        return self


def load_eval_config(path: str | Path) -> EvalSuiteConfig:
    return validate(EvalSuiteConfig, read_yaml(path), str(path))


# ---------------------------------------------------------------- metrics


def predicted_label(reply: str, labels: list[str]) -> str | None:
    """The label named first in the reply (whole words, case-insensitive)."""
    hits = [
        (m.start(), label)
        for label in labels
        for m in [re.search(rf"\b{re.escape(label)}\b", reply, re.IGNORECASE)]
        if m
    ]
    return min(hits)[1] if hits else None


def macro_f1(preds: list[str | None], refs: list[str], labels: list[str]) -> float:
    scores = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
        fp = sum(p == label and r != label for p, r in zip(preds, refs, strict=True))
        fn = sum(p != label and r == label for p, r in zip(preds, refs, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return sum(scores) / len(scores)


def answer_metrics(
    task: TaskConfig, prompts, replies: list[str], refs: list[str]
) -> dict[str, float]:
    out: dict[str, float] = {}
    n = max(len(refs), 1)
    if "exact_match" in task.metrics:
        out["exact_match"] = sum(r == a.strip() for r, a in zip(replies, refs, strict=True)) / n
    if "contains" in task.metrics:
        out["contains"] = (
            sum(a.strip().lower() in r.lower() for r, a in zip(replies, refs, strict=True)) / n
        )
    if "regex" in task.metrics:
        pattern = re.compile(task.regex)
        out["regex"] = sum(bool(pattern.search(r)) for r in replies) / n
    if {"accuracy", "f1"} & set(task.metrics):
        preds = [predicted_label(r, task.labels) for r in replies]
        gold = [predicted_label(a, task.labels) or a.strip() for a in refs]
        if "accuracy" in task.metrics:
            out["accuracy"] = sum(p == g for p, g in zip(preds, gold, strict=True)) / n
        if "f1" in task.metrics:
            out["f1"] = macro_f1(preds, gold, task.labels)
    if "judge" in task.metrics:
        out["judge"] = judge_score(task.judge, prompts, replies, refs)
    return out


def judge_score(cfg: JudgeConfig, prompts, replies, refs) -> float:
    """Mean grade in [0, 1] from an OpenAI-compatible endpoint comparing reply and reference."""
    from jobs.data.quality import JudgeScorer

    scorer = JudgeScorer(
        cfg.model_copy(
            update={
                "rubric": cfg.rubric
                or (
                    "Grade the ASSISTANT reply against the REFERENCE answer for the USER request, from 1 "
                    "(wrong) to 10 (as good as the reference). Reply with the number only."
                )
            }
        )
    )
    examples = [
        {"messages": [*p, {"role": "assistant", "content": f"{r}\n\nREFERENCE: {a}"}]}
        for p, r, a in zip(prompts, replies, refs, strict=True)
    ]
    grades = scorer.score(examples)
    return sum(s for s, _ in grades) / max(len(grades), 1)


def with_few_shot(prompt: list[dict], shots: list[list[dict]]) -> list[dict]:
    """The k examples become earlier user/assistant turns, after any system message."""
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns = []
    for shot in shots:
        p, a = prompt_and_answer(shot)
        turns += [m for m in p if m["role"] != "system"] + [{"role": "assistant", "content": a}]
    return system + turns + prompt[len(system) :]


# ---------------------------------------------------------------- the evaluation


def evaluate(
    cfg: EvalSuiteConfig,
    adapter: Path | None,
    base_model: str,
    run_data: DataConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of base (zero-/few-shot) and base + adapter per task, the guard set, the gate."""
    models = Models.load(base_model, adapter, cfg.batch_size, cfg.engine, cfg.engine_args)
    try:
        results: dict[str, Any] = {
            "base_model": base_model,
            "adapter": str(adapter) if adapter else None,
            "tasks": {},
        }
        for task in cfg.tasks:
            data = task.data or run_data
            if data is None:
                raise ConfigError(
                    f"tasks.{task.name}.data: give a data section (or evaluate a run directory)"
                )
            prepared = prepare_data(data, models.tokenizer, seed)
            results["tasks"][task.name], samples = evaluate_task(task, prepared, models, cfg)
            if samples is not None:
                results.setdefault("samples", {})[task.name] = samples
        if cfg.guard is not None:
            guard = prepare_data(cfg.guard, models.tokenizer, seed)
            results["guard"] = {
                f"{k}_loss": v for k, v in models.losses(guard.train + guard.eval).items()
            }
        if cfg.gate is not None and models.tuned is not None:
            results["gate"] = gate(cfg.gate, results)
    finally:
        models.close()
    return results


@dataclass
class Models:
    """The base model and, with an adapter, base + adapter: one set of weights, the adapter
    switched off for the base's numbers; with engine vllm, a vLLM engine writes the replies."""

    tokenizer: Any
    base: Any
    tuned: Any | None  # a PeftModel around `base`
    batch_size: int
    vllm: VLLMGenerator | None = None

    @classmethod
    def load(
        cls,
        base_model: str,
        adapter: Path | None,
        batch_size: int,
        engine: str = "transformers",
        engine_args: dict[str, Any] | None = None,
    ) -> Models:
        from peft import PeftModel

        model_cfg = ModelConfig(name_or_path=base_model)
        tokenizer = load_tokenizer(model_cfg)
        base = load_base_model(model_cfg, torch.device("cpu"))
        tuned = PeftModel.from_pretrained(base, str(adapter)) if adapter else None
        vllm = None
        if engine == "vllm":
            path = resolve_model_path(model_cfg)
            stops = stop_token_ids(base, tokenizer)
            vllm = VLLMGenerator.start(
                path, adapter, tokenizer, stops, base.dtype, engine_args or {}
            )
        return cls(tokenizer, base, tuned, batch_size, vllm)

    def close(self) -> None:
        """Stops the vLLM engine's processes (the transformers models need nothing)."""
        if self.vllm is not None:
            self.vllm.llm.llm_engine.engine_core.shutdown()

    def replies(self, prompts: list[list[dict]], max_new_tokens: int, adapter: bool) -> list[str]:
        """Greedy replies of base + adapter (adapter=True) or of the base."""
        if self.vllm is not None:
            return self.vllm.replies(prompts, max_new_tokens, adapter)
        ids = [chat_prompt_ids(self.tokenizer, p) for p in prompts]
        with nullcontext() if adapter else self.as_base():
            model = self.tuned if adapter else self.model
            replies = greedy_generate(
                model, self.tokenizer, ids, max_new_tokens, batch_size=self.batch_size, rt=CPU
            )
        return [r.text.strip() for r in replies]

    def as_base(self):
        """A context in which `model` answers as the base does."""
        return self.tuned.disable_adapter() if self.tuned is not None else nullcontext()

    @property
    def model(self):
        return self.base if self.tuned is None else self.tuned

    def losses(self, examples) -> dict[str, float]:
        """Reference-answer loss of the base and, with an adapter, of base + adapter."""
        with self.as_base():
            losses = {"base": self._loss(examples)}
        if self.tuned is not None:
            losses["adapter"] = self._loss(examples)
        return losses

    def _loss(self, examples) -> float:
        return eval_loss(self.model, examples, self.batch_size, self.tokenizer.pad_token_id, CPU)


# vLLM's accepted max_lora_rank values (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class VLLMGenerator:
    """Greedy replies from vLLM's offline engine with what inference/generate.py uses: the same
    chat template token ids, the same stop tokens, the same decoding."""

    llm: Any
    tokenizer: Any
    lora: Any | None  # the adapter's LoRARequest
    stop_ids: list[int]

    @classmethod
    def start(
        cls,
        model_path: str,
        adapter: Path | None,
        tokenizer,
        stop_ids: set[int],
        dtype,
        engine_args: dict[str, Any],
    ) -> VLLMGenerator:
        from vllm.lora.request import LoRARequest

        from inference.vllm import offline_llm

        args: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "seed": 0}
        lora = None
        if adapter:
            rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
            if rank > VLLM_LORA_RANKS[-1]:
                raise ConfigError(
                    f"{adapter}: LoRA rank {rank} is above vLLM's {VLLM_LORA_RANKS[-1]}; "
                    "evaluate it with engine: transformers"
                )
            max_rank = min(r for r in VLLM_LORA_RANKS if r >= rank)
            args.update(enable_lora=True, max_loras=1, max_lora_rank=max_rank)
            lora = LoRARequest("adapter", 1, str(adapter))
        llm = offline_llm(model_path, **{**args, **engine_args})
        return cls(llm, tokenizer, lora, sorted(stop_ids))

    def replies(self, prompts: list[list[dict]], max_new_tokens: int, adapter: bool) -> list[str]:
        """One call holds base rows or adapter rows, never both: a batch without LoRA rows
        skips vLLM's LoRA ops, so the CPU bug serve/vllm_plugin.py fixes (base rows batched
        with LoRA rows) cannot reach these replies."""
        from vllm import SamplingParams

        tok = self.tokenizer
        ids = [chat_prompt_ids(tok, p) for p in prompts]
        # ignore_eos leaves vLLM's own idea of the EOS out: the stop tokens are exactly
        # inference/generate.py's stop_token_ids.
        params = SamplingParams(
            temperature=0,
            max_tokens=max_new_tokens,
            ignore_eos=True,
            stop_token_ids=self.stop_ids,
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": i} for i in ids],
            params,
            lora_request=self.lora if adapter else None,
            use_tqdm=False,
        )
        return [
            tok.decode(out.outputs[0].token_ids, skip_special_tokens=True).strip()
            for out in outputs
        ]


def evaluate_task(
    task: TaskConfig, prepared, models: Models, cfg: EvalSuiteConfig
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """(a task's scores per model, the adapter's first replies kept as samples, None without
    an adapter), on the task's held-out rows."""
    convs = prepared.eval_conversations[: task.max_samples]
    prompts, refs = zip(*(prompt_and_answer(c) for c in convs), strict=True)
    prompts, refs = list(prompts), list(refs)
    scores: dict[str, dict[str, float]] = {"base": {}, "adapter": {}}
    if {"loss", "perplexity"} & set(task.metrics):
        for who, loss in models.losses(prepared.eval[: task.max_samples]).items():
            if "loss" in task.metrics:
                scores[who]["loss"] = loss
            if "perplexity" in task.metrics:
                scores[who]["perplexity"] = perplexity(loss)
    samples = None
    if set(task.metrics) - {"loss", "perplexity"}:
        samples = answer_scores(task, prepared, prompts, refs, models, scores)
        samples = samples[: cfg.keep_samples] if samples is not None else None
    if models.tuned is None:
        scores.pop("adapter")
    return {"rows": len(convs), **scores}, samples


def answer_scores(task, prepared, prompts, refs, models: Models, scores) -> list[dict] | None:
    """The answer metrics of each baseline (zero- and few-shot) and of the adapter, into
    `scores`; the adapter's replies with their prompts (None without an adapter)."""
    shots = _train_conversations(prepared, task.few_shot)
    variants = {"base": prompts}
    if task.few_shot:
        variants["base_few_shot"] = [with_few_shot(p, shots) for p in prompts]
    for who, ps in variants.items():
        replies = models.replies(ps, task.max_new_tokens, adapter=False)
        scores.setdefault(who, {}).update(answer_metrics(task, ps, replies, refs))
    if models.tuned is None:
        return None
    replies = models.replies(prompts, task.max_new_tokens, adapter=True)
    scores["adapter"].update(answer_metrics(task, prompts, replies, refs))
    return [
        {"prompt": p[-1]["content"], "reference": a, "reply": r, "messages": p}
        for p, a, r in zip(prompts, refs, replies, strict=True)
    ]


def _train_conversations(prepared, k: int) -> list[list[dict]]:
    """The first k training conversations: few-shot examples never come from the test rows."""
    return prepared.train_samples[:k]


def gate(cfg: GateConfig, results: dict[str, Any]) -> dict[str, Any]:
    """Pass when the adapter beats every baseline by the margin and the guard holds."""
    task, _, metric = cfg.metric.partition(".")
    scores = results["tasks"][task]
    lower = metric in LOWER_IS_BETTER
    baselines = {
        who: s[metric]
        for who, s in scores.items()
        if who != "adapter" and isinstance(s, dict) and metric in s
    }
    best_name = (min if lower else max)(baselines, key=baselines.get)
    best, mine = baselines[best_name], scores["adapter"][metric]
    improvement = (best - mine) if lower else (mine - best)
    reasons = []
    if improvement < cfg.margin:
        reasons.append(
            f"{cfg.metric}: adapter {mine:.4f} vs best baseline {best_name} {best:.4f}: improvement {improvement:+.4f} < margin {cfg.margin}"
        )
    guard = results.get("guard")
    if guard:
        limit = guard["base_loss"] * (1 + cfg.guard_tolerance)
        if guard["adapter_loss"] > limit:
            reasons.append(
                f"guard loss {guard['adapter_loss']:.4f} > base {guard['base_loss']:.4f} x (1 + {cfg.guard_tolerance}) (forgetting)"
            )
    return {
        "passed": not reasons,
        "metric": cfg.metric,
        "adapter": mine,
        "best_baseline": best_name,
        "baseline": best,
        "margin": cfg.margin,
        "guard_tolerance": cfg.guard_tolerance,
        "reasons": reasons,
        "forced": False,
    }


# ---------------------------------------------------------------- a run or an adapter, and the CLI


def evaluate_target(
    target: str | Path, cfg: EvalSuiteConfig, base: str | None = None
) -> tuple[dict[str, Any], str]:
    """A run directory (adapter/ + run.json) or an adapter directory, local or s3:// (read from a
    temporary copy) -> (results, where eval.json was written: beside them, in the same storage)."""
    target = str(target).rstrip("/")
    is_run = url_exists(f"{target}/run.json")
    with local_copy(target, ("run.json", "adapter") if is_run else None) as local:
        if is_run:
            run = json.loads((local / "run.json").read_text())
            data = DataConfig.model_validate(run["config"]["data"])
            results = evaluate(
                cfg,
                local / "adapter",
                base or cfg.base_model or run["base_model"],
                data,
                run["seed"],
            )
        elif (local / "adapter_config.json").is_file():
            base_model = (
                base
                or cfg.base_model
                or json.loads((local / "adapter_config.json").read_text())[
                    "base_model_name_or_path"
                ]
            )
            results = evaluate(cfg, local, base_model)
        else:
            raise ConfigError(f"{target}: neither a run directory (run.json) nor a peft adapter")
    results["adapter"] = f"{target}/adapter" if is_run else target  # not the temporary copy
    out = f"{target}/eval.json"
    with open_url(out, "w") as f:
        f.write(json.dumps(results, indent=2))
    return results, out


def main(
    target: Annotated[str, typer.Argument(help="run or adapter directory (local or s3://)")],
    config: Annotated[Path, typer.Argument(help="eval YAML")],
    base: Annotated[str | None, typer.Option(help="base model (default: the run's)")] = None,
) -> None:
    """Evaluate an adapter against its base (zero- and few-shot) and apply the gate."""
    results, out = evaluate_target(target, load_eval_config(config), base)
    print_results(results)
    typer.echo(f"written: {out}")
    if results.get("gate") and not results["gate"]["passed"]:
        raise typer.Exit(1)


def print_results(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, scores in results["tasks"].items():
        table = Table(title=f"{name} ({scores['rows']} rows)")
        who = [k for k in scores if k != "rows"]
        metrics = sorted({m for k in who for m in scores[k]})
        table.add_column("model")
        for m in metrics:
            table.add_column(m, justify="right")
        for k in who:
            table.add_row(k, *(f"{scores[k][m]:.4f}" if m in scores[k] else "-" for m in metrics))
        console.print(table)
    if "guard" in results:
        console.print(f"guard loss: {results['guard']}")
    if "gate" in results:
        g = results["gate"]
        console.print("GATE PASSED" if g["passed"] else "GATE FAILED: " + "; ".join(g["reasons"]))


if __name__ == "__main__":
    cli.run(main)
