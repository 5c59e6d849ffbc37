"""One pipeline: a JSONL file in, a gated adapter live on the endpoint out, in one command.

    python -m tune.pipeline configs/pipeline.yaml [key.sub=value ...] [--from STAGE]

prepare (jobs/prepare.py) -> sweep (tune/sweep.py) -> evaluate the best trial against the
baselines and gate it (tune/evaluate.py) -> promote it into the registry under an alias
(tune/registry/promote.py) -> serve: the running app, or one started here (serve/app.py), which picks up
the alias move by itself -> canary: the eval set's first prompts through the endpoint must give
the offline evaluation's answers, else the alias is rolled back -> report (table, report.md).

The YAML composes the existing configs: `job`, `sweep` and `eval` are file paths (or the same
mappings inline) and `serve.config` names a Serve config file; `job.train.weight_decay=0.01` or
`sweep.num_trials=2` on the command line reach into them.

prepare, sweep and evaluate write into WORKDIR/NAME/STAGE-KEY/, KEY a hash of what decides the
stage's output: the data files' bytes and the data config; the dataset hash and the job and sweep
configs; the adapter's weights, the dataset hash and the eval config. A stage directory with
stage.json is finished, and a rerun reads it instead of running it; `--from STAGE` runs that
stage and every later one again. Promotion is skipped when the alias already points at the
version; serve and canary always run (they check the live endpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import Field

from core import cli
from core.config import ConfigError, Section, apply_overrides, parse_overrides, read_yaml, validate
from core.registry import DEFAULT_ALIAS
from core.storage import is_remote
from core.upstream import require
from jobs.config import JobConfig, validate_config
from serve.config import ServeSettings
from tune.evaluate import EvalSuiteConfig
from tune.sweep import SweepConfig

log = logging.getLogger("rayft.pipeline")

STAGES = ("prepare", "sweep", "evaluate", "promote", "serve", "canary")
VERSION_HEADER = "x-adapter-version"  # serve/app.py


class ServeSection(Section):
    config: str  # a Serve config file (configs/serve.yaml); its application is what serves
    application: str | None = None  # the application's name in that file; default: the first
    args: dict[str, Any] = {}  # overrides of its args (serve/config.py's ServeSettings fields)
    url: str | None = None  # an app already running (its base URL): use it; null: start one here
    port: int | None = Field(None, ge=1, le=65535)  # an app started here: instead of http_options'
    keep_running: bool = False  # an app started here keeps serving after the pipeline
    api_key_env: str | None = None  # the variable holding the canary's key (an app with tenants)
    ready_timeout_s: float = Field(120, gt=0)  # for the app to start and answer /health


class PromoteSection(Section):
    name: str
    alias: str = DEFAULT_ALIAS


class CanarySection(Section):
    prompts: int = Field(3, ge=1)  # the eval set's first k prompts (at most eval.keep_samples)
    timeout_s: float = Field(30, gt=0)  # beyond the app's alias_ttl_s, for the new version to show


class PipelineConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    workdir: str = "pipelines"  # stage outputs and the report: WORKDIR/NAME/
    job: JobConfig  # default: the sweep's job
    sweep: SweepConfig  # its `job` is the job above; its `promote` is replaced by the pipeline's
    eval: EvalSuiteConfig  # must have a gate
    serve: ServeSection
    promote: PromoteSection
    canary: CanarySection = CanarySection()


@dataclass
class Loaded:
    """The validated config, the app's settings, and what the pipeline YAML was made of."""

    cfg: PipelineConfig
    settings: ServeSettings
    app: dict[str, Any]  # the Serve config's application entry (name, route_prefix)
    http: dict[str, Any]  # the Serve config's http_options
    path: str
    overrides: list[str]
    files: dict[str, str]  # section -> the file it came from


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> Loaded:
    """Compose the pipeline YAML with the files it names, apply dotted overrides, check it all."""
    require("ray", why=f"{path}: the pipeline deploys its Serve app through core/upstream/ray.py")
    parsed = parse_overrides(overrides or [])
    raw, files = compose(read_yaml(path), parsed)
    where = str(path) + "".join(f", {k}: {v}" for k, v in files.items())
    cfg = validate(PipelineConfig, raw, where)
    check_pipeline(cfg, where)
    check_job_overrides(cfg, where, parsed)
    app, settings, http = serve_application(cfg, where)
    return Loaded(cfg, settings, app, http, str(path), list(overrides or []), files)


def compose(
    raw: dict[str, Any], overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The pipeline mapping with its sections read from the files they name, overrides applied;
    (it, section -> the file it came from)."""
    files: dict[str, str] = {}
    # Sections given as file paths are read first, so that overrides reach into them.
    for key in ("sweep", "job", "eval"):
        if key == "job" and "job" not in raw and isinstance(raw.get("sweep"), dict):
            raw["job"] = raw["sweep"].get("job")  # the sweep's own job
        if isinstance(raw.get(key), str):
            files[key] = raw[key]
            raw[key] = read_yaml(raw[key])
    raw = apply_overrides(raw, overrides)
    if isinstance(raw.get("sweep"), dict):
        # The pipeline evaluates, gates and promotes itself, and runs the job named above.
        raw["sweep"] = {**raw["sweep"], "job": files.get("job", "<inline>"), "promote": None}
    return raw, files


def check_pipeline(cfg: PipelineConfig, where: str) -> None:
    """What the sections cannot check alone: how the pipeline uses them together."""
    if cfg.eval.gate is None:
        raise ConfigError(f"{where}: eval.gate: the pipeline needs a gate section")
    for key, value in (("workdir", cfg.workdir), ("sweep.storage_path", cfg.sweep.storage_path)):
        if is_remote(value):  # stage caching and the report read local files
            raise ConfigError(
                f"{where}: {key}: {value}: the pipeline keeps its stages, the sweep included, "
                "under a local workdir; for a sweep on S3 run python -m tune.sweep"
            )
    swept_data = [k for k in cfg.sweep.space if k.startswith("data.")]
    if swept_data:
        raise ConfigError(
            f"{where}: sweep.space.{swept_data[0]}: the pipeline prepares the data once; "
            "sweep other keys"
        )
    trial_job(cfg)  # every trial's job must load
    if cfg.canary.prompts > cfg.eval.keep_samples:
        raise ConfigError(
            f"{where}: canary.prompts ({cfg.canary.prompts}) is above eval.keep_samples "
            f"({cfg.eval.keep_samples}), the replies the evaluation keeps"
        )


def check_job_overrides(cfg: PipelineConfig, where: str, overrides: dict[str, Any]) -> None:
    """A job.KEY override that every trial replaces would do nothing: an error that says where
    to set it instead."""
    from tune.sweep import TRIAL_KEYS, overlapping

    swept_by_override = {item.partition("=")[0]: item for item in cfg.sweep.overrides}
    for key, value in overrides.items():
        if not key.startswith("job."):
            continue
        job_key = key.removeprefix("job.")
        if swept := overlapping(job_key, cfg.sweep.space):
            why = f"is overridden by sweep.space.{swept}; change the space instead"
        elif shadow := overlapping(job_key, swept_by_override):
            why = (
                f"is overridden by sweep.overrides ({swept_by_override[shadow]}); "
                "change sweep.overrides instead"
            )
        elif trial := overlapping(job_key, TRIAL_KEYS):
            why = f"is set by the sweep for every trial ({TRIAL_KEYS[trial]})"
        else:
            continue
        raise ConfigError(f"{where}: {key}={value} {why}")


def serve_application(cfg: PipelineConfig, where: str):
    """The Serve config's application that serves: (its entry, its settings, http_options)."""
    serve_file = read_yaml(cfg.serve.config)
    apps = serve_file.get("applications") or []
    chosen = [a for a in apps if cfg.serve.application in (None, a.get("name"))][:1]
    if not chosen:
        raise ConfigError(
            f"{cfg.serve.config}: no application {cfg.serve.application or ''} (serve.application)"
        )
    app = chosen[0]
    settings = validate(
        ServeSettings,
        {**(app.get("args") or {}), **cfg.serve.args},
        f"{cfg.serve.config} (serve.args)",
    )
    if not settings.registry:
        raise ConfigError(
            f"{cfg.serve.config}: args.registry: the pipeline promotes into the app's registry; "
            "give one"
        )
    if settings.tenants and not settings.allow_unauthenticated:
        env = cfg.serve.api_key_env
        if not env:
            raise ConfigError(
                f"{where}: serve.api_key_env: the app has tenants; name the variable holding the "
                "canary's API key"
            )
        if not os.environ.get(env):
            raise ConfigError(
                f"{where}: serve.api_key_env: {env} is not set (export {env}=<a tenant's key>)"
            )
    return app, settings, serve_file.get("http_options") or {}


def trial_job(cfg: PipelineConfig, prepared: str | None = None) -> JobConfig:
    """The job as the sweep runs it: the sweep's overrides and its space's first values applied,
    reading the prepared set when given."""
    probe = [f"{k}={next(iter(v.values()))[0]}" for k, v in cfg.sweep.space.items()]
    raw = apply_overrides(
        job_mapping(cfg, prepared), parse_overrides([*cfg.sweep.overrides, *probe])
    )
    return validate_config(raw, "job (with sweep.overrides)")


def job_mapping(cfg: PipelineConfig, prepared: str | None = None) -> dict[str, Any]:
    raw = cfg.job.model_dump(mode="json", exclude_unset=True)
    if prepared:
        raw["data"] = {**raw["data"], "prepared": prepared}
    return raw


def content_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the run's record


@dataclass
class Stage:
    name: str
    status: str = "not run"  # ran | cached | live | failed | skipped | rolled back | not run
    seconds: float = 0.0
    detail: str = ""
    dir: str | None = None


@dataclass
class Prepared:
    """prepare's result: the prepared set every trial reads."""

    path: str
    dataset_hash: str


@dataclass
class BestTrial:
    """sweep's result: the best finished trial, which evaluate and promote take on."""

    run_dir: Path
    plot: Path  # the sweep's eval loss per trial (eval_curves.png)


@dataclass
class Evaluated:
    """evaluate's result."""

    results: dict[str, Any]  # eval.json: scores, the gate, the replies the canary replays
    version: str  # the adapter's registry version (a hash of its weights)
    plot: Path  # gate.png


@dataclass
class Promoted:
    """promote's result: whether this run moved the alias, from what, and when."""

    previous: str | None  # the alias's version before this run
    moved: bool
    at: float = 0.0  # time.monotonic() of the move


@dataclass
class Endpoint:
    """serve's result: where the app is (answering /health once the serve stage has passed)."""

    url: str
    started_here: bool = False  # the pipeline started the app (and stops it, unless keep_running)


@dataclass
class Run:
    """The pipeline's record: each stage's status, and what the stages passed on."""

    loaded: Loaded
    root: Path
    from_stage: str | None
    stages: dict[str, Stage] = field(default_factory=lambda: {s: Stage(s) for s in STAGES})
    prepared: Prepared | None = None
    best: BestTrial | None = None
    evaluated: Evaluated | None = None
    promoted: Promoted | None = None
    endpoint: Endpoint | None = None
    rolled_back_to: str | None = None  # the canary moved the alias back to this version

    @property
    def version(self) -> str | None:
        """The evaluated adapter's version (known once evaluate has run, gate passed or not)."""
        return self.evaluated.version if self.evaluated else None

    def cached(self, stage: str, stage_dir: Path) -> bool:
        """Finished before (stage.json there) and not asked to run again with --from."""
        forced = self.from_stage is not None and STAGES.index(stage) >= STAGES.index(
            self.from_stage
        )
        if forced and stage_dir.exists():
            shutil.rmtree(stage_dir)
        return not forced and (stage_dir / "stage.json").is_file()

    @property
    def failed(self) -> Stage | None:
        return next(
            (s for s in self.stages.values() if s.status in ("failed", "rolled back")), None
        )

    @property
    def ok(self) -> bool:
        return self.failed is None and all(s.status != "skipped" for s in self.stages.values())


def finish_stage(stage_dir: Path, record: dict[str, Any]) -> None:
    """stage.json goes last: its presence says the stage's outputs are all there."""
    (stage_dir / "stage.json").write_text(json.dumps(record, indent=2, default=str))


def workdir(cfg: PipelineConfig) -> Path:
    """WORKDIR/NAME. Inside a Ray job's working_dir (a temporary copy Ray deletes) a relative
    workdir goes under the home directory, like the job's checkpoints (jobs/finetune.py)."""
    import ray

    path = Path(cfg.workdir).expanduser()
    if not path.is_absolute() and ray.get_runtime_context().runtime_env.get("working_dir"):
        path = Path.home() / path
    return path.resolve() / cfg.name


# ---------------------------------------------------------------- the stages, in order


def prepare_stage(run: Run) -> None:
    """The job's data section through jobs/prepare.py, once per content of the data files."""
    from jobs.data.prepare import PrepareConfig, prepare, read_manifest
    from jobs.data.sources import expand_source, file_sha256

    cfg = run.loaded.cfg
    job = trial_job(cfg)
    if job.data.prepared:  # the user gave a prepared set: nothing to do
        dataset_hash = read_manifest(job.data.prepared)["dataset_hash"]
        run.prepared = Prepared(job.data.prepared, dataset_hash)
        run.stages["prepare"].status, run.stages["prepare"].detail = "cached", "data.prepared given"
        return
    files = [f.url for i, s in enumerate(job.data.all_sources()) for f in expand_source(i, s)]
    key = content_key(
        {
            "data": job.data.model_dump(mode="json"),
            "files": {u: file_sha256(u) for u in files},
            "tokenizer": job.model.name_or_path,
            "seed": job.run.seed,
        }
    )
    out = run.root / f"prepare-{key}"
    stage = run.stages["prepare"]
    stage.dir = str(out)
    if run.cached("prepare", out):
        manifest = read_manifest(str(out))
        stage.status = "cached"
    else:
        manifest = prepare(
            PrepareConfig(
                data=job.data, tokenizer=job.model.name_or_path, output=str(out), seed=job.run.seed
            ),
            show_progress=False,
        ).data
        finish_stage(
            out, {"stage": "prepare", "key": key, "dataset_hash": manifest["dataset_hash"]}
        )
        stage.status = "ran"
    c = manifest["counts"]
    stage.detail = f"{c['input_rows']} rows -> {c['train']} train / {c['eval']} eval, {manifest['dataset_hash'][:19]}"
    run.prepared = Prepared(str(out), manifest["dataset_hash"])


def sweep_stage(run: Run) -> None:
    """tune/sweep.py over the job reading the prepared set; the best finished trial goes on."""
    from tune.sweep import run_sweep

    cfg = run.loaded.cfg
    job = job_mapping(cfg, run.prepared.path)
    sweep = cfg.sweep.model_dump(mode="json", exclude={"name", "job", "storage_path", "promote"})
    key = content_key({"dataset_hash": run.prepared.dataset_hash, "job": job, "sweep": sweep})
    out = run.root / f"sweep-{key}"
    stage = run.stages["sweep"]
    stage.dir = str(out)
    if run.cached("sweep", out):
        summary = json.loads((out / "results.json").read_text())
        stage.status = "cached"
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.yaml").write_text(
            yaml.safe_dump(job, sort_keys=False)
        )  # what every trial loads
        sweep_cfg = cfg.sweep.model_copy(
            update={"name": out.name, "storage_path": str(run.root), "job": str(out / "job.yaml")}
        )
        summary = run_sweep(sweep_cfg)  # resumes an interrupted sweep in this directory
        stage.status = "ran"
    finished = [
        t for t in summary["trials"] if t["run_dir"] and (Path(t["run_dir"]) / "run.json").is_file()
    ]
    if not finished:
        stage.status, stage.detail = (
            "failed",
            "no trial finished (errors: "
            + "; ".join(str(t["error"]) for t in summary["trials"] if t["error"])
            + ")",
        )
        return
    if stage.status == "ran":
        record = {"stage": "sweep", "key": key, "dataset_hash": run.prepared.dataset_hash}
        finish_stage(out, record)
    best = finished[0]
    params = ", ".join(
        f"{k}={best[k]:.3g}" if isinstance(best[k], float) else f"{k}={best[k]}"
        for k in cfg.sweep.space
    )
    stage.detail = f"{len(summary['trials'])} trials, best {best['trial']} ({params}) eval loss {best['best_eval_loss']:.4f}"
    run.best = BestTrial(Path(best["run_dir"]), out / "eval_curves.png")


def evaluate_stage(run: Run) -> None:
    """tune/evaluate.py on the best trial: baselines, guard set, gate."""
    from tune.evaluate import evaluate_target
    from tune.registry import adapter_version

    cfg = run.loaded.cfg
    run_dir = run.best.run_dir
    version = adapter_version(run_dir / "adapter")
    key = content_key(
        {
            "adapter": version,
            "dataset_hash": run.prepared.dataset_hash,
            "eval": cfg.eval.model_dump(mode="json"),
        }
    )
    out = run.root / f"evaluate-{key}"
    stage = run.stages["evaluate"]
    stage.dir = str(out)
    if run.cached("evaluate", out):
        results = json.loads((out / "eval.json").read_text())
        stage.status = "cached"
    else:
        results, _ = evaluate_target(run_dir, cfg.eval)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2))
        plot_gate(results, out / "gate.png")
        finish_stage(out, {"stage": "evaluate", "key": key, "adapter_version": version})
        stage.status = "ran"
    gate = results["gate"]
    run.evaluated = Evaluated(results, version, out / "gate.png")
    stage.detail = f"{gate['metric']}: adapter {gate['adapter']:.3f} vs {gate['best_baseline']} {gate['baseline']:.3f}"
    if not gate["passed"]:
        stage.status = "failed"
        stage.detail += "; GATE FAILED: " + "; ".join(gate["reasons"])


def promote_stage(run: Run) -> None:
    """tune/registry/promote.py into the serve app's registry; the alias moves unless it is already there."""
    from tune.registry import Registry
    from tune.registry.promote import gate_and_promote
    from tune.servability import ServingLimits

    cfg, settings = run.loaded.cfg, run.loaded.settings
    name, alias, stage = cfg.promote.name, cfg.promote.alias, run.stages["promote"]
    pipeline = {
        "name": cfg.name,
        "config": run.loaded.path,
        "overrides": run.loaded.overrides,
        "stages": {s: run.stages[s].dir for s in ("prepare", "sweep", "evaluate")},
    }
    promotion = gate_and_promote(
        Registry(settings.registry),
        run.best.run_dir,
        name,
        alias,
        run.evaluated.results,
        limits=ServingLimits(max_lora_rank=settings.max_lora_rank),
        lineage_extra={"pipeline": pipeline},
    )
    if not promotion.promoted:
        stage.status, stage.detail = "failed", promotion.reason
        return
    run.promoted = Promoted(promotion.previous, promotion.moved, time.monotonic())
    if not promotion.moved:
        stage.status, stage.detail = "cached", f"{name}@{alias} is already {promotion.version}"
        return
    before = promotion.previous or "none"
    stage.status, stage.detail = "ran", f"{name}@{alias}: {before} -> {promotion.version}"


def serve_stage(run: Run) -> None:
    """The endpoint: the app at serve.url, or the Serve config's application run on this Ray."""
    import httpx

    cfg = run.loaded.cfg
    stage = run.stages["serve"]
    started = False
    if cfg.serve.url:
        url, status, how = cfg.serve.url.rstrip("/"), "live", "running app"
    else:
        url, started = start_app(run.loaded)
        status, how = (
            ("ran", "started here") if started else ("live", "already running on this Ray")
        )
    run.endpoint = Endpoint(url, started)  # even if it never answers: started here, stopped here
    deadline = time.monotonic() + cfg.serve.ready_timeout_s
    while True:  # the app answers once Serve's HTTP proxy has it
        try:
            httpx.get(f"{url}/health", timeout=5).raise_for_status()
            break
        except httpx.HTTPError as e:
            if time.monotonic() > deadline:
                stage.status, stage.detail = "failed", f"{url}/health: {type(e).__name__}: {e}"
                return
            time.sleep(0.5)
    stage.status, stage.detail = status, f"{url} ({how})"


def start_app(loaded: Loaded) -> tuple[str, bool]:
    """The app as `serve run CONFIG` starts it (Serve's deploy of the config's application entry,
    its `deployments:` options such as autoscaling included), with the args the pipeline resolved
    (paths made absolute: replicas do not share this working directory), unless this Ray already
    runs it; (its URL, whether it was started now)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from core.ray_cluster import init_ray
    from core.upstream.ray import deploy_serve_config

    init_ray()
    name, prefix = loaded.app.get("name", "default"), loaded.app.get("route_prefix", "/")
    host = loaded.http.get("host", "127.0.0.1")
    port = loaded.cfg.serve.port or loaded.http.get("port", 8000)
    url = f"http://{host}:{port}{prefix.rstrip('/')}"
    try:
        running = serve.status().applications.get(name)
    except Exception:  # no Serve on this cluster yet
        running = None
    if running is not None and running.status == "RUNNING":
        return url, False
    s = loaded.settings.model_copy()
    for key in ("base_model", "registry", "tenants", "adapter_download_dir"):
        value = getattr(s, key)
        if value and not is_remote(value) and Path(value).expanduser().exists():
            setattr(s, key, str(Path(value).expanduser().resolve()))
    s.adapters = {n: str(Path(p).expanduser().resolve()) for n, p in s.adapters.items()}
    app = {
        **loaded.app,
        "name": name,
        "route_prefix": prefix,
        "args": s.model_dump(mode="json", exclude_defaults=True),
    }
    app["runtime_env"] = app_runtime_env(app.get("runtime_env") or {})
    http = {**loaded.http, "host": host, "port": port}
    config = ServeDeploySchema.model_validate({"http_options": http, "applications": [app]})
    deploy_serve_config(config)
    deadline = time.monotonic() + loaded.cfg.serve.ready_timeout_s
    while (status := serve.status().applications.get(name)) is None or status.status != "RUNNING":
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"{loaded.cfg.serve.config}: application {name}: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"application {name} not running after serve.ready_timeout_s ({loaded.cfg.serve.ready_timeout_s:g} s): {status and status.message}"
            )
        time.sleep(0.5)
    return url, True


def app_runtime_env(env: dict) -> dict:
    """Serve's controller imports the app's import path in a task of its own, which does not get
    this job's runtime env: give it this job's working_dir (`ray job submit --working-dir .`, on
    any node), or else this checkout on its PYTHONPATH (the embedded local Ray)."""
    import ray

    if "working_dir" in env or "py_modules" in env:
        return env
    job_dir = (ray.get_runtime_context().runtime_env or {}).get("working_dir")
    if job_dir:
        return {**env, "working_dir": job_dir}
    env_vars = env.get("env_vars") or {}
    paths = [str(Path(__file__).resolve().parents[1]), env_vars.get("PYTHONPATH", "")]
    return {**env, "env_vars": {**env_vars, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}}


def canary_stage(run: Run) -> None:
    """The eval set's first k prompts through the endpoint, greedy: each answer must equal the
    offline evaluation's and come from the promoted version, else the alias moves back."""
    cfg, settings = run.loaded.cfg, run.loaded.settings
    stage = run.stages["canary"]
    task_name = cfg.eval.gate.metric.partition(".")[0]
    task = next(t for t in cfg.eval.tasks if t.name == task_name)
    samples = run.evaluated.results["samples"][task_name][: cfg.canary.prompts]
    name, alias, version = cfg.promote.name, cfg.promote.alias, run.version
    ask = endpoint_client(run, f"{name}@{alias}", task.max_new_tokens)
    # The app caches alias resolution for alias_ttl_s per replica: after that every replica
    # reads the moved alias. Waiting here, then checking each answer's version header, needs no
    # restart and no cache flush.
    if run.promoted.moved:
        time.sleep(max(0.0, run.promoted.at + settings.alias_ttl_s - time.monotonic()))
    problems = canary_problems(run, ask, samples)
    if not problems:
        stage.status = "ran"
        stage.detail = (
            f"{len(samples)}/{len(samples)} answers equal the offline evaluation's "
            f"({name}@{alias} = {version})"
        )
        return
    stage.status = "failed"
    stage.detail = "; ".join(problems)
    roll_back(run, ask, samples[0]["messages"])


def endpoint_client(run: Run, model: str, max_tokens: int):
    """ask(messages) -> (the answer's version header, its text), greedy, with the canary's key."""
    import httpx

    key = os.environ.get(run.loaded.cfg.serve.api_key_env or "", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{run.endpoint.url}/v1/chat/completions"

    def ask(messages) -> tuple[str, str]:
        body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        r = httpx.post(url, json=body, headers=headers, timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return r.headers.get(VERSION_HEADER, "?"), r.json()["choices"][0]["message"]["content"]

    return ask


def canary_problems(run: Run, ask, samples: list[dict[str, Any]]) -> list[str]:
    """Each sample's prompt asked until the promoted version answers (or canary.timeout_s has
    passed): what differs from the offline evaluation."""
    import httpx

    version, problems = run.version, []
    deadline = time.monotonic() + run.loaded.cfg.canary.timeout_s
    try:
        for i, sample in enumerate(samples):
            served, reply = ask(sample["messages"])
            while served != version and time.monotonic() < deadline:  # a replica still caching
                time.sleep(0.2)
                served, reply = ask(sample["messages"])
            if served != version:
                problems.append(f"prompt {i}: served by version {served}, not {version}")
            elif reply.strip() != sample["reply"]:
                problems.append(
                    f"prompt {i}: endpoint {reply.strip()!r} != offline {sample['reply']!r}"
                )
    except (httpx.HTTPError, RuntimeError) as e:
        problems.append(f"{run.endpoint.url}: {type(e).__name__}: {e}")
    return problems


def roll_back(run: Run, ask, messages: list[dict]) -> None:
    """After a failed canary: the alias back where it was, if this run moved it and nothing has
    moved it since; the stage's detail says what was done and what the endpoint serves."""
    import httpx

    from tune.registry import Registry

    cfg, settings, stage = run.loaded.cfg, run.loaded.settings, run.stages["canary"]
    name, alias, version = cfg.promote.name, cfg.promote.alias, run.version
    registry = Registry(settings.registry)
    if not run.promoted.moved:
        stage.detail += f"; the alias was {version} before this run: not rolled back"
    elif registry.aliases(name).get(alias) != version:
        stage.detail += "; the alias has moved since this run moved it: not rolled back"
    elif run.promoted.previous is None:
        stage.detail += (
            f"; no earlier version of {name}@{alias} to roll back to: it stays {version}, "
            "move it by hand"
        )
    else:
        previous = registry.rollback(name, alias)
        time.sleep(settings.alias_ttl_s)
        served = "?"
        try:
            served, _ = ask(messages)
        except (httpx.HTTPError, RuntimeError) as e:
            served = f"unknown ({type(e).__name__})"
        stage.status = "rolled back"
        stage.detail += f"; {name}@{alias} rolled back to {previous} (endpoint serves {served})"
        run.rolled_back_to = previous


# ---------------------------------------------------------------- the recipe


def run_pipeline(loaded: Loaded, from_stage: str | None = None) -> Run:
    """Every stage in order; a failed stage stops the ones after it (marked skipped)."""
    from core.ray_cluster import init_ray

    init_ray()  # the sweep's trials and the app run on this Ray (RAY_ADDRESS, or a local one)
    run = Run(loaded, workdir(loaded.cfg), from_stage)
    run.root.mkdir(parents=True, exist_ok=True)
    steps = {
        "prepare": prepare_stage,
        "sweep": sweep_stage,
        "evaluate": evaluate_stage,
        "promote": promote_stage,
        "serve": serve_stage,
        "canary": canary_stage,
    }
    for name, step in steps.items():
        stage = run.stages[name]
        if run.failed:
            stage.status, stage.detail = "skipped", f"{run.failed.name} {run.failed.status}"
            continue
        log.info("pipeline: %s", name)
        start = time.monotonic()
        try:
            step(run)
        except Exception as e:  # the report still says which stage and why
            log.exception("pipeline: %s failed", name)
            stage.status, stage.detail = "failed", f"{type(e).__name__}: {e}"
        stage.seconds = round(time.monotonic() - start, 1)
    write_report(run)
    return run


# ---------------------------------------------------------------- the report


def plot_gate(results: dict[str, Any], path: Path) -> None:
    """The gate metric of each baseline and of the adapter, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gate = results["gate"]
    task, _, metric = gate["metric"].partition(".")
    scores = {
        who: s[metric]
        for who, s in results["tasks"][task].items()
        if isinstance(s, dict) and metric in s
    }
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(scores), list(scores.values()), color=["#999"] * (len(scores) - 1) + ["#2a7"])
    ax.set_ylabel(gate["metric"])
    ax.set_title(
        ("gate passed" if gate["passed"] else "gate failed") + f" (margin {gate['margin']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run: Run) -> None:
    """WORKDIR/NAME/report.md (stages, wall times, plots) and report.json; no config values
    beyond names and paths, so no secret can reach them."""
    cfg = run.loaded.cfg
    verdict = outcome(run)
    lines = [
        f"# Pipeline {cfg.name}",
        "",
        f"{verdict}",
        "",
        f"config: `{run.loaded.path}` {' '.join(run.loaded.overrides)}",
        "",
        "| stage | status | wall s | detail |",
        "|---|---|---:|---|",
    ]
    for s in run.stages.values():
        lines.append(f"| {s.name} | {s.status} | {s.seconds} | {s.detail.replace('|', '/')} |")
    plots = {
        "Sweep: eval loss per trial": run.best and run.best.plot,
        "Gate": run.evaluated and run.evaluated.plot,
    }
    for title, plot in plots.items():
        if plot and plot.is_file():
            lines += ["", f"## {title}", "", f"![{title}]({plot.relative_to(run.root)})"]
    if run.version and run.stages["promote"].status in ("ran", "cached"):
        lines += [
            "",
            "## Trace an answer",
            "",
            f"The endpoint's `{VERSION_HEADER}` header names the version; its chain to the data and code:",
            "",
            f"    python -m tune.registry show {cfg.promote.name}@{run.version} "
            f"--registry {run.loaded.settings.registry}",
        ]
    (run.root / "report.md").write_text("\n".join(lines) + "\n")
    record = {
        "name": cfg.name,
        "ok": run.ok,
        "outcome": verdict,
        "config": run.loaded.path,
        "overrides": run.loaded.overrides,
        "version": run.version,
        "stages": {s.name: vars(s) for s in run.stages.values()},
    }
    (run.root / "report.json").write_text(json.dumps(record, indent=2, default=str))


def outcome(run: Run) -> str:
    cfg = run.loaded.cfg
    ref = f"{cfg.promote.name}@{cfg.promote.alias}"
    if run.ok:
        return f"{ref} = {run.version}, live at {run.endpoint.url}"
    failed = run.failed
    return f"{ref} not changed: {failed.name} {failed.status}: {failed.detail}"


def print_report(run: Run) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pipeline {run.loaded.cfg.name}")
    for col in ("stage", "status", "wall s", "detail"):
        table.add_column(col, justify="right" if col == "wall s" else "left")
    for s in run.stages.values():
        table.add_row(s.name, s.status, f"{s.seconds:.1f}", s.detail)
    console = Console()
    if not console.is_terminal:  # job logs: rich would wrap the table at 80 columns
        console = Console(width=200)
    console.print(table)
    print(outcome(run))
    print(f"report: {run.root / 'report.md'}")


# ---------------------------------------------------------------- CLI


def main(
    config: Annotated[Path, typer.Argument(help="pipeline YAML")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides: sweep.num_trials=2")
    ] = None,
    from_stage: Annotated[
        str | None, typer.Option("--from", help=f"run again from this stage: {', '.join(STAGES)}")
    ] = None,
) -> None:
    """prepare -> sweep -> evaluate + gate -> promote -> serve -> canary; exit 1 when the gate or
    the canary failed (the endpoint then serves what it served before)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if from_stage is not None and from_stage not in STAGES:
        cli.fail(f"--from {from_stage}: one of {', '.join(STAGES)}")
    loaded = load_pipeline_config(config, overrides or [])
    run = run_pipeline(loaded, from_stage)
    print_report(run)
    if run.endpoint and run.endpoint.started_here:
        if loaded.cfg.serve.keep_running and not os.environ.get("RAY_ADDRESS"):
            serve_until_interrupted(run.endpoint.url)
        elif not loaded.cfg.serve.keep_running:
            from ray import serve

            serve.delete(loaded.app.get("name", "default"))
    raise typer.Exit(0 if run.ok else 1)


def serve_until_interrupted(url: str) -> None:
    """This process owns the local Ray: the app it started lives as long as it does."""
    print(f"serving at {url}/v1 - Ctrl-C stops")
    # Tune leaves its own SIGINT handler (stop the sweep) installed after the sweep
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli.run(main)
