"""tune.pipeline end to end on the tiny model and 2 CPUs: one run from data/reviews.jsonl to an
adapter served by the app the pipeline starts (answers traced to the data through the version
header and the registry), then on the same Ray and app: a rerun that skips the finished stages,
`--from evaluate`, a gate that fails (the endpoint keeps serving what it served), and a canary
mismatch (the alias moves back). Also the config's checks, without Ray."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import openai
import pytest
import yaml

from core.config import ConfigError
from jobs.data.sources import file_sha256
from serve.tenants import hash_key
from serve.testing import make_random_adapter
from tests.helpers import REPO, free_port
from tune.pipeline import load_pipeline_config, run_pipeline
from tune.registry import Registry, lineage_chain

KEY = "sk-test-pipeline-canary-0001"  # must never reach the report, logs or lineage
TTL = 0.2  # the app's alias_ttl_s


def write_configs(tmp: Path, tiny_model_dir: Path) -> tuple[Path, list[str]]:
    """A pipeline YAML naming the shipped sweep config and embedding the eval config, a Serve config on a free port,
    and the command-line overrides that make the sweep tiny (2 trials of 40 steps)."""
    tenants = tmp / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {"tenants": [{"name": "ci", "key_sha256": hash_key(KEY), "adapters": ["*"]}]}
        )
    )
    serve_cfg = yaml.safe_load((REPO / "configs/serve.yaml").read_text())
    serve_cfg["applications"][0]["args"].update(
        base_model=str(tiny_model_dir),
        registry=str(tmp / "registry"),
        tenants=str(tenants),
        alias_ttl_s=TTL,
        max_lora_rank=16,
    )
    (tmp / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    # the shipped eval inline (a section may be a mapping instead of a path), on fewer rows
    evaluation = yaml.safe_load((REPO / "configs/eval_reviews.yaml").read_text())
    evaluation["tasks"][0]["max_samples"] = 32
    pipeline = {
        "name": "reviews",
        "workdir": str(tmp / "pipelines"),
        "sweep": str(REPO / "configs/sweep_reviews.yaml"),
        "eval": evaluation,
        "serve": {
            "config": str(tmp / "serve.yaml"),
            "keep_running": True,
            "api_key_env": "RAYFT_API_KEY",
        },
        "promote": {"name": "reviews", "alias": "production"},
        "canary": {"prompts": 3},
    }
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    overrides = [
        f"job.model.name_or_path={tiny_model_dir}",
        "sweep.num_trials=2",
        "sweep.max_concurrent_trials=2",
        "sweep.space={lora.r: {choice: [8]}, train.lr: {choice: [2.0e-3, 3.0e-3]}}",
        "sweep.overrides=[scaling.cpus_per_worker=1, train.max_steps=40, eval.every_steps=20, "
        "checkpoint.every_steps=20, eval.early_stopping_patience=null, eval.max_generate_samples=8]",
        f"serve.port={free_port()}",
    ]
    return tmp / "pipeline.yaml", overrides


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir, ray_local):
    """One whole run on a local Ray; the app it starts keeps serving for the module's tests. The
    alias first points at a random adapter P, so that moves and rollbacks have somewhere to go."""
    from ray import serve

    tmp = tmp_path_factory.mktemp("pipeline")
    saved_cwd, saved_key = os.getcwd(), os.environ.get("RAYFT_API_KEY")
    os.chdir(REPO)  # the job's data/reviews.jsonl, as on the command line
    os.environ["RAYFT_API_KEY"] = KEY
    path, overrides = write_configs(tmp, tiny_model_dir)
    registry = Registry(str(tmp / "registry"))
    earlier = make_random_adapter(tiny_model_dir, tmp / "earlier", seed=1, r=4)
    previous = registry.register(earlier, "reviews", {"base_model": str(tiny_model_dir)})
    registry.set_alias("reviews", "production", previous)
    loaded = load_pipeline_config(path, overrides)
    start = time.monotonic()
    first = run_pipeline(loaded)
    yield {
        "loaded": loaded,
        "path": path,
        "overrides": overrides,
        "first": first,
        "tmp": tmp,
        "registry": registry,
        "previous": previous,
        "first_s": time.monotonic() - start,
    }
    serve.shutdown()
    os.chdir(saved_cwd)
    if saved_key is None:
        os.environ.pop("RAYFT_API_KEY", None)
    else:
        os.environ["RAYFT_API_KEY"] = saved_key


def chat(url: str, messages: list[dict], model: str = "reviews@production") -> tuple[str, str]:
    """(answer, x-adapter-version) through the OpenAI client, greedy."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=4, temperature=0
    )
    return raw.parse().choices[0].message.content, raw.headers["x-adapter-version"]


def statuses(run) -> dict[str, str]:
    return {s.name: s.status for s in run.stages.values()}


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_serves_the_gated_adapter_and_traces_its_answers_to_the_data(pipeline):
    run, registry = pipeline["first"], pipeline["registry"]
    assert run.ok, statuses(run) | {"why": run.failed and run.failed.detail}
    assert statuses(run) == dict.fromkeys(statuses(run), "ran")
    version = run.version
    assert registry.aliases("reviews")["production"] == version != pipeline["previous"]

    # started as `serve run CONFIG` starts it: the config's `deployments:` options apply
    from ray.serve.context import _get_global_client

    app = _get_global_client().get_serve_details()["applications"]["rayft"]
    deployed = app["deployments"]["VllmServer"]["deployment_config"]  # configs/serve.yaml: vllm
    assert deployed["autoscaling_config"]["max_replicas"] == 4
    assert deployed["autoscaling_config"]["target_ongoing_requests"] == 16

    sample = run.evaluated.results["samples"]["sentiment"][0]
    answer, served = chat(run.endpoint.url, sample["messages"])
    assert served == version and answer.strip() == sample["reply"]

    # header -> lineage.json -> run -> dataset hash -> source file and code
    lineage = registry.lineage(f"reviews@{served}")
    run_json = json.loads((Path(lineage["run"]["dir"]) / "run.json").read_text())
    assert lineage["dataset_hash"] == run_json["dataset_hash"] == run.prepared.dataset_hash
    assert run_json["config"]["data"]["prepared"] == run.stages["prepare"].dir
    (source,) = [f for s in lineage["data_sources"] for f in s["files"]]
    assert source["url"] == "data/reviews.jsonl" and source["sha256"] == file_sha256(
        str(REPO / "data/reviews.jsonl")
    )
    assert (
        lineage["code"]["sha"] and lineage["pipeline"]["stages"]["sweep"] == run.stages["sweep"].dir
    )
    chain = "\n".join(lineage_chain(lineage))
    assert (
        f"reviews@{version}" in chain
        and lineage["dataset_hash"] in chain
        and source["sha256"] in chain
    )

    report = (run.root / "report.md").read_text()
    for name in ("eval_curves.png", "gate.png"):
        assert name in report and next(run.root.rglob(name)).stat().st_size > 0
    written = [
        run.root / "report.md",
        run.root / "report.json",
        *registry.fs.glob(f"{registry.base}/reviews/*/lineage.json"),
    ]
    assert not [f for f in written if KEY in Path(f).read_text()]
    print(
        f"first run {pipeline['first_s']:.0f} s:", {s.name: s.seconds for s in run.stages.values()}
    )


@pytest.mark.integration
@pytest.mark.slow
def test_rerun_skips_finished_stages_and_from_reruns_a_stage(pipeline):
    loaded, first = pipeline["loaded"], pipeline["first"]
    trials = sorted(Path(first.stages["sweep"].dir, "runs").iterdir())
    again = run_pipeline(loaded)
    assert statuses(again) == {
        "prepare": "cached",
        "sweep": "cached",
        "evaluate": "cached",
        "promote": "cached",
        "serve": "live",
        "canary": "ran",
    }
    assert sorted(Path(first.stages["sweep"].dir, "runs").iterdir()) == trials
    assert again.stages["sweep"].seconds < 5

    eval_json = Path(first.stages["evaluate"].dir) / "eval.json"
    written = eval_json.stat().st_mtime_ns
    redone = run_pipeline(loaded, from_stage="evaluate")
    assert statuses(redone)["sweep"] == "cached" and statuses(redone)["evaluate"] == "ran"
    assert eval_json.stat().st_mtime_ns != written
    assert redone.ok and redone.version == first.version


@pytest.mark.integration
@pytest.mark.slow
def test_a_failing_gate_leaves_the_endpoint_unchanged(pipeline):
    registry, previous, url = (
        pipeline["registry"],
        pipeline["previous"],
        pipeline["first"].endpoint.url,
    )
    registry.set_alias("reviews", "production", previous)
    # exact match cannot improve by more than 1: the gate fails on a real evaluation
    strict = load_pipeline_config(
        pipeline["path"], [*pipeline["overrides"], "eval.gate.margin=1.5"]
    )
    run = run_pipeline(strict)
    assert not run.ok
    assert statuses(run) == {
        "prepare": "cached",
        "sweep": "cached",
        "evaluate": "failed",
        "promote": "skipped",
        "serve": "skipped",
        "canary": "skipped",
    }
    assert registry.aliases("reviews")["production"] == previous
    time.sleep(TTL)
    assert chat(url, [{"role": "user", "content": "Review: fine."}])[1] == previous
    report = (run.root / "report.md").read_text()
    assert "reviews@production not changed: evaluate failed" in report
    assert "GATE FAILED" in report and "< margin 1.5" in report


@pytest.mark.integration
@pytest.mark.slow
def test_a_canary_mismatch_rolls_the_alias_back(pipeline):
    """The offline answers the canary compares with are changed on disk: the endpoint (serving
    the promoted adapter) then disagrees with them, as it would if serving drifted from eval."""
    registry, previous, first = pipeline["registry"], pipeline["previous"], pipeline["first"]
    registry.set_alias("reviews", "production", previous)
    eval_json = Path(first.stages["evaluate"].dir) / "eval.json"
    original = eval_json.read_text()
    results = json.loads(original)
    results["samples"]["sentiment"][1]["reply"] += " (not what the endpoint says)"
    eval_json.write_text(json.dumps(results))
    try:
        run = run_pipeline(pipeline["loaded"], from_stage="promote")
    finally:
        eval_json.write_text(original)
    assert statuses(run)["promote"] == "ran" and statuses(run)["canary"] == "rolled back"
    assert not run.ok and "prompt 1: endpoint" in run.stages["canary"].detail
    assert registry.aliases("reviews")["production"] == previous
    assert [e["reason"] for e in registry.alias_history("reviews", "production")][-2:] == [
        "promote",
        "rollback",
    ]
    assert f"rolled back to {previous} (endpoint serves {previous})" in run.stages["canary"].detail
    assert chat(first.endpoint.url, [{"role": "user", "content": "Review: fine."}])[1] == previous


def test_pipeline_config_is_checked_before_anything_runs(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAYFT_API_KEY", KEY)
    shipped = load_pipeline_config(REPO / "configs/pipeline.yaml")
    assert shipped.files == {
        "sweep": "configs/sweep_reviews.yaml",
        "job": "configs/quickstart.yaml",
        "eval": "configs/eval_reviews.yaml",
    }
    assert shipped.cfg.job.data.train_files == ["data/reviews.jsonl"]
    shipped_path = REPO / "configs/pipeline.yaml"
    assert (
        load_pipeline_config(
            shipped_path, ["job.train.weight_decay=0.01"]
        ).cfg.job.train.weight_decay
        == 0.01
    )
    # a job override that every trial replaces would do nothing: an error saying where to set it
    with pytest.raises(
        ConfigError,
        match="job.train.lr=0.001 is overridden by sweep.space.train.lr; change the space instead",
    ):
        load_pipeline_config(shipped_path, ["job.train.lr=1e-3"])
    with pytest.raises(
        ConfigError,
        match=r"job.train.max_steps=5 is overridden by sweep.overrides \(train.max_steps=60\)",
    ):
        load_pipeline_config(shipped_path, ["job.train.max_steps=5"])
    with pytest.raises(ConfigError, match="job.run.name=x is set by the sweep for every trial"):
        load_pipeline_config(shipped_path, ["job.run.name=x"])
    from typer.testing import CliRunner

    from core import cli
    from tune.pipeline import main

    app = cli.app()
    app.command()(cli.config_errors_exit_2(main))  # as cli.run(main) makes it
    shadowed = CliRunner().invoke(app, [str(shipped_path), "job.train.lr=1e-3"])
    assert shadowed.exit_code == 2
    assert "error: " in shadowed.output and "job.train.lr=0.001 is overridden" in shadowed.output
    path, overrides = write_configs(tmp_path, tiny_model_dir)
    with pytest.raises(
        ConfigError, match="unknown key 'job.train.lrr' \\(did you mean 'job.train.lr'"
    ):
        load_pipeline_config(path, [*overrides, "job.train.lrr=1"])
    with pytest.raises(
        ConfigError, match="sweep.num_trials: Input should be greater than or equal to 1"
    ):
        load_pipeline_config(path, [*overrides, "sweep.num_trials=0"])
    with pytest.raises(ConfigError, match="serve.args.*max_batch_size"):
        load_pipeline_config(path, [*overrides, "serve.args.max_batch_size=0"])
    with pytest.raises(ConfigError, match="canary.prompts \\(9\\) is above eval.keep_samples"):
        load_pipeline_config(path, [*overrides, "canary.prompts=9"])
    with pytest.raises(ConfigError, match="sweep.space.data.max_seq_len"):
        load_pipeline_config(path, [*overrides, "sweep.space={data.max_seq_len: {choice: [64]}}"])
    with pytest.raises(
        ConfigError, match="sweep.storage_path: s3://b/s: the pipeline keeps its stages"
    ):
        load_pipeline_config(path, [*overrides, "sweep.storage_path=s3://b/s"])
    monkeypatch.delenv("RAYFT_API_KEY")
    with pytest.raises(ConfigError, match="serve.api_key_env: RAYFT_API_KEY is not set") as e:
        load_pipeline_config(path, overrides)
    assert KEY not in str(e.value)
    shutil.rmtree(tmp_path / "pipelines", ignore_errors=True)
