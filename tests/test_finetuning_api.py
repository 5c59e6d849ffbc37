"""Shared by the fine-tuning API tests: a tenants file with fresh keys, the app's settings, and a
real `ray start --head` (token auth, the Jobs API) with the serving app on it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import urllib.request
from pathlib import Path

import openai
import yaml

from serve.tenants import hash_key
from tests.helpers import BIN, REPO, free_port, start_ray_head, stop_ray_head, wait_for

KEYS = {"acme": "sk-acme-" + secrets.token_hex(8), "beta": "sk-beta-" + secrets.token_hex(8)}


def write_tenants(path: Path) -> Path:
    tenants = [
        {"name": "acme", "key_sha256": hash_key(KEYS["acme"]), "adapters": ["reviews-*"]},
        {"name": "beta", "key_sha256": hash_key(KEYS["beta"]), "adapters": ["*"]},
    ]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


def settings(tmp: Path, tiny_model_dir: Path, dashboard: str | None, **limits) -> dict:
    return {
        "engine": "hf",
        "base_model": str(tiny_model_dir),
        "tenants": str(write_tenants(tmp / "tenants.yaml")),
        "registry": str(tmp / "registry"),
        "max_lora_rank": 64,
        "context_window": 256,
        "alias_ttl_s": 0.2,
        "finetuning": {
            "database_url": f"sqlite:///{tmp}/state.db",
            "files": str(tmp / "files"),
            "runs": str(tmp / "runs"),
            "ray_address": dashboard,
            "python": str(BIN / "python"),
            "reconcile_every_s": 1,
            "progress_every_s": 1,
            "base_models": {
                "tiny-llama": {
                    "job": "configs/quickstart.yaml",
                    "overrides": {
                        "model.name_or_path": str(tiny_model_dir),
                        "scaling.cpus_per_worker": 1,
                        "rollout.cpus_per_actor": 0,  # reinforcement: shares the trainer's CPU
                        "checkpoint.every_steps": 4,
                        "eval.every_steps": 4,
                        "eval.early_stopping_patience": None,
                        "eval.max_generate_samples": 8,
                    },
                }
            },
            "limits": {"max_concurrent_jobs": 3, **limits},
        },
    }


def client(base_url: str, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEYS[tenant], max_retries=0, timeout=120)


def training_rows(n: int) -> bytes:
    rows = (REPO / "data/reviews.jsonl").read_text().splitlines()[:n]
    return ("\n".join(rows) + "\n").encode()


def jobs_api_ready(address: str, token: str) -> bool:
    # The dashboard answers before its job agent has registered; a submit in between fails.
    probe = urllib.request.Request(
        f"{address}/api/jobs/",
        data=json.dumps({"entrypoint": "true"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(probe, timeout=30)
        return True
    except Exception:
        return False


@contextlib.contextmanager
def ray_head(num_cpus: int = 4):
    """A head of this module's own; the driver (this process) connected to it with the token."""
    import ray

    token = secrets.token_hex(16)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    dashboard_port, port = free_port(), free_port()
    # Every port of our own: other heads on this machine hold Ray's defaults (10001, 52365).
    ports = [
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    proc, session_dir, _ = start_ray_head(
        f"--num-cpus={num_cpus}", *ports, port=port, dashboard_port=dashboard_port, env=auth
    )
    saved = {k: os.environ.get(k) for k in auth}
    refresh_auth(auth)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for(lambda: jobs_api_ready(address, token), 300, f"the Jobs API at {address}", 1)
        ray.shutdown()  # the session's local Ray: this module's driver joins the head
        ray.init(
            address=f"127.0.0.1:{port}",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        )
        yield address
    finally:
        ray.shutdown()
        stop_ray_head(proc, session_dir)
        refresh_auth(saved)


def refresh_auth(env: dict) -> None:
    """Token auth for this process's Ray core: it caches the mode and the token when first read."""
    from ray._raylet import AuthenticationTokenLoader, Config

    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# ---------------------------------------------------------------------- the fast tests
# (seconds; those marked integration start a server on 127.0.0.1, as the repo's marker says)
# The API's own behaviour on a real FastAPI app (the router the serving app mounts) served by
# uvicorn on 127.0.0.1, real SQLite and storage, the real openai client. No Ray cluster: the
# jobs' Ray jobs cannot be submitted here (tests/test_finetuning_api_jobs.py runs them), so
# created jobs stay validating_files, which is what the limits and listings below need.

import threading  # noqa: E402

import pytest  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from openai.types import FileObject  # noqa: E402
from openai.types.fine_tuning import FineTuningJob  # noqa: E402

from serve.config import ServeSettings  # noqa: E402
from serve.finetuning import api as ft_api  # noqa: E402
from serve.finetuning import db, models, params  # noqa: E402
from serve.finetuning.config import JobRequest  # noqa: E402
from serve.finetuning.service import FineTuning  # noqa: E402
from serve.tenants import Tenants  # noqa: E402


@pytest.fixture(scope="module")
def api_server(tiny_model_dir, tmp_path_factory):
    import uvicorn

    from serve import app as serve_app

    tmp = tmp_path_factory.mktemp("ftapi-fast")
    args = settings(
        tmp,
        tiny_model_dir,
        f"http://127.0.0.1:{free_port()}",
        max_file_bytes=20_000,
        max_total_bytes=50_000,
    )
    args["finetuning"]["limits"]["max_concurrent_jobs"] = 2
    s = ServeSettings.model_validate(args)
    service = FineTuning(s.finetuning, s.registry, s.max_lora_rank)
    ft_api.install(service, Tenants.from_file(s.tenants))
    app = FastAPI()
    app.include_router(ft_api.router)
    app.add_exception_handler(serve_app.ApiError, serve_app._api_error)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn")
    yield {"url": f"http://127.0.0.1:{port}/v1", "tmp": tmp, "service": service}
    server.should_exit = True
    thread.join(timeout=10)
    ft_api.install(None, None)


def error_of(call):
    import openai

    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


def test_model_ids_map_to_registry_names_in_one_place():
    job_id = db.new_id("ftjob")
    model = models.model_id("tiny-llama", "acme", "reviews", job_id)
    assert model == f"ft:tiny-llama:acme:reviews:{job_id.removeprefix('ftjob-')}"
    parsed = models.parse(model)
    assert (parsed.job_id, parsed.registry_name, parsed.selector) == (job_id, job_id, None)
    ckpt = models.parse(models.checkpoint_model_id(model, 12))
    assert (ckpt.registry_name, ckpt.selector) == (job_id, "step-12")
    assert models.parse(models.model_id("tiny-llama", "acme", None, job_id)).job_id == job_id
    for bad in (
        "ft:a:b:c",
        "ft:a:b:c:nothex",
        f"{model}:ckpt-x",
        "reviews",
        f"{model}:ckpt-step-1:x",
    ):
        assert models.parse(bad) is None
    assert models.is_reserved(job_id) and not models.is_reserved("reviews")


def test_an_event_is_written_once_with_the_next_sequence_number(tmp_path):
    sessions = db.connect(f"sqlite:///{tmp_path}/state.db")
    job_id = insert_job(sessions, "acme")
    assert db.add_event(sessions, job_id, "created", "Created")
    assert not db.add_event(sessions, job_id, "created", "Created again")  # a repeat: nothing
    threads = [
        threading.Thread(target=db.add_event, args=(sessions, job_id, f"step-{i}", f"Step {i}"))
        for i in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sessions() as s:
        rows = list(s.scalars(db.select(db.EventRow).where(db.EventRow.job_id == job_id)))
    assert sorted(r.seq for r in rows) == list(range(1, 22))
    assert len({r.key for r in rows}) == 21


def test_a_status_moves_only_from_the_states_given(tmp_path):
    sessions = db.connect(f"sqlite:///{tmp_path}/state.db")
    job_id = insert_job(sessions, "acme")
    assert db.set_status(sessions, job_id, "cancelled", only_from=db.ACTIVE)
    # a runner that did not see the cancel cannot make the job running or succeeded
    assert not db.set_status(sessions, job_id, "running", only_from=("queued", "validating_files"))
    assert not db.set_status(sessions, job_id, "succeeded", only_from=("running",))
    assert db.get_job(sessions, job_id).status == "cancelled"
    assert db.get_job(sessions, job_id).finished_at is not None


def insert_job(sessions, tenant: str) -> str:
    job_id = db.new_id("ftjob")
    with db.transaction(sessions) as s:
        s.add(
            db.JobRow(
                id=job_id,
                tenant=tenant,
                model="tiny-llama",
                training_file="file-x",
                seed=1,
                method={"type": "supervised", "supervised": {"hyperparameters": {}}},
                job_config={},
                runner={},
                status="validating_files",
                created_at=db.now(),
                result_files=[],
                attempt=0,
                ordinal=db.ordinal(),
            )
        )
    return job_id


def test_hyperparameters_reach_the_job_config_and_auto_means_the_template(tiny_model_dir, tmp_path):
    s = ServeSettings.model_validate(settings(tmp_path, tiny_model_dir, None))
    entry = s.finetuning.base_models["tiny-llama"]

    def build(**body):
        req = JobRequest.model_validate({"model": "tiny-llama", "training_file": "file-1", **body})
        return params.build_job_config(
            req, entry, db.new_id("ftjob"), str(tmp_path), "/data/t.jsonl", None
        )

    cfg, method, seed = build(seed=7)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.effective_batch_size) == (4, 2e-3, 16)
    assert seed == 7 and cfg.run.seed == 7 and cfg.data.train_files == ["/data/t.jsonl"]
    assert method == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 4, "batch_size": 16, "learning_rate_multiplier": 1.0}
        },
    }
    hp = {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}
    cfg, method, _ = build(method={"type": "supervised", "supervised": {"hyperparameters": hp}})
    assert (cfg.train.epochs, cfg.train.effective_batch_size, cfg.train.micro_batch_size) == (
        2,
        8,
        8,
    )
    assert cfg.train.lr == pytest.approx(1e-3)
    cfg, method, _ = build(
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}},
        rayft={"lora_rank": 4, "max_steps": 3},
    )
    assert (cfg.train.method, cfg.train.dpo.beta, cfg.lora.r, cfg.train.max_steps) == (
        "dpo",
        0.3,
        4,
        3,
    )
    assert cfg.data.train_files == [params.pairs_uri(str(tmp_path), cfg.run.name, "train")]
    assert method["dpo"]["hyperparameters"]["beta"] == 0.3
    cfg, _, _ = build(hyperparameters={"n_epochs": 5})  # OpenAI's deprecated top-level field
    assert cfg.train.epochs == 5


@pytest.mark.integration  # a server on 127.0.0.1
def test_files_in_openai_shapes_per_tenant(api_server):
    acme, beta = client(api_server["url"]), client(api_server["url"], "beta")
    f = acme.files.create(file=("train.jsonl", training_rows(10)), purpose="fine-tune")
    FileObject.model_validate(f.model_dump())
    assert (f.purpose, f.filename, f.bytes) == ("fine-tune", "train.jsonl", len(training_rows(10)))
    assert acme.files.retrieve(f.id) == f
    assert acme.files.content(f.id).read() == training_rows(10)
    for call in (
        lambda: beta.files.retrieve(f.id),
        lambda: beta.files.content(f.id),
        lambda: beta.files.delete(f.id),
    ):
        assert error_of(call)[0] == 404
    assert f.id not in [x.id for x in beta.files.list()]
    deleted = acme.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    assert error_of(lambda: acme.files.retrieve(f.id))[0] == 404


@pytest.mark.integration  # a server on 127.0.0.1
def test_files_paginate(api_server):
    c = client(api_server["url"], "beta")
    ids = [c.files.create(file=(f"f{i}.jsonl", b"{}\n"), purpose="fine-tune").id for i in range(5)]
    pages, after = [], None
    while True:
        page = c.files.list(limit=2, **({"after": after} if after else {}))
        pages.append([x.id for x in page.data])
        if not page.has_more:
            break
        after = page.data[-1].id
    assert [i for p in pages for i in p] == list(reversed(ids))  # newest first
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [x.id for x in c.files.list(order="asc")] == ids
    assert [x.id for x in c.files.list(order="asc", after=ids[1], limit=2).data] == ids[2:4]
    for i in ids:
        c.files.delete(i)


@pytest.mark.integration  # a server on 127.0.0.1
def test_file_limits_are_400s_in_openai_shape(api_server):
    c = client(api_server["url"], "beta")
    status, body = error_of(
        lambda: c.files.create(file=("big.jsonl", b"x" * 20_001), purpose="fine-tune")
    )
    assert status == 400 and body["code"] == "file_too_large" and body["param"] == "file"
    kept = [
        c.files.create(file=(f"k{i}.jsonl", b"x" * 19_000), purpose="fine-tune") for i in range(2)
    ]
    status, body = error_of(
        lambda: c.files.create(file=("k3.jsonl", b"x" * 19_000), purpose="fine-tune")
    )
    assert status == 400 and body["code"] == "storage_limit_exceeded"
    status, body = error_of(lambda: c.files.create(file=("a.jsonl", b"{}"), purpose="assistants"))
    assert status == 400 and body["param"] == "purpose"
    for f in kept:
        c.files.delete(f.id)


GRADER = {
    "type": "string_check",
    "name": "label",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}


@pytest.mark.integration  # a server on 127.0.0.1
def test_job_requests_we_cannot_honour_are_400s_naming_the_field(api_server):
    acme, beta = client(api_server["url"]), client(api_server["url"], "beta")
    f = acme.files.create(file=("t.jsonl", training_rows(10)), purpose="fine-tune")
    theirs = beta.files.create(file=("t.jsonl", training_rows(10)), purpose="fine-tune")
    create = acme.fine_tuning.jobs.create
    cases = [
        (dict(model="tiny-llamaz", training_file=f.id), "model", "tiny-llamaz"),
        (
            dict(
                model="tiny-llama",
                training_file=f.id,
                method={"type": "reinforcement", "reinforcement": {}},
            ),
            "method.reinforcement.grader",
            "grader",
        ),
        (
            dict(
                model="tiny-llama",
                training_file=f.id,
                method={
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": GRADER,
                        "hyperparameters": {"compute_multiplier": 2},
                    },
                },
            ),
            "method.reinforcement.hyperparameters.compute_multiplier",
            "compute_multiplier",
        ),
        (
            dict(
                model="tiny-llama",
                training_file=f.id,
                method={
                    "type": "reinforcement",
                    "reinforcement": {"grader": {**GRADER, "operation": "similar"}},
                },
            ),
            "method",
            "train.grpo.grader",
        ),
        (
            dict(
                model="tiny-llama",
                training_file=f.id,
                method={
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": {
                            "type": "multi",
                            "name": "m",
                            "graders": {
                                "a": {"type": "python", "name": "p", "function": "os:getcwd"}
                            },
                            "calculate_output": "a",
                        }
                    },
                },
            ),
            "method.reinforcement.grader.graders.a.function",
            "function",
        ),
        (
            dict(
                model="tiny-llama",
                training_file=f.id,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epoch": 3}}},
            ),
            "method.supervised.hyperparameters.n_epoch",
            "n_epoch",
        ),
        (
            dict(
                model="tiny-llama",
                training_file=f.id,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
            ),
            "method.supervised.hyperparameters.n_epochs",
            "n_epochs",
        ),
        (dict(model="tiny-llama", training_file=theirs.id), "training_file", theirs.id),
        (dict(model="tiny-llama", training_file="file-nope"), "training_file", "file-nope"),
        (
            dict(
                model="tiny-llama",
                training_file=f.id,
                integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
            ),
            "integrations",
            "integrations",
        ),
        (
            dict(model="tiny-llama", training_file=f.id, extra_body={"rayft": {"lora_rnk": 8}}),
            "rayft.lora_rnk",
            "lora_rnk",
        ),
        (
            dict(model="tiny-llama", training_file=f.id, extra_body={"temperature": 1}),
            "temperature",
            "temperature",
        ),
    ]
    for kwargs, param, named in cases:
        status, body = error_of(lambda kwargs=kwargs: create(**kwargs))
        assert status == 400, (kwargs, body)
        assert body["param"] == param and named in body["message"], body
        assert body["type"] == "invalid_request_error"


@pytest.mark.integration  # a server on 127.0.0.1
def test_jobs_per_tenant_limit_and_pagination(api_server):
    acme, beta = client(api_server["url"]), client(api_server["url"], "beta")
    f = acme.files.create(file=("t.jsonl", training_rows(10)), purpose="fine-tune")
    jobs = [
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, metadata={"n": str(i)})
        for i in range(2)
    ]
    for job in jobs:
        FineTuningJob.model_validate(job.model_dump())
        assert job.status == "validating_files" and job.organization_id == "acme"
    status, body = error_of(
        lambda: acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    )
    assert status == 429 and body["code"] == "too_many_jobs"
    first = acme.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == [jobs[1].id] and first.has_more
    rest = acme.fine_tuning.jobs.list(limit=5, after=jobs[1].id)
    assert [j.id for j in rest.data] == [jobs[0].id] and not rest.has_more
    assert [j.id for j in acme.fine_tuning.jobs.list(metadata={"n": "0"})] == [jobs[0].id]
    assert beta.fine_tuning.jobs.list().data == []
    for call in (
        lambda: beta.fine_tuning.jobs.retrieve(jobs[0].id),
        lambda: beta.fine_tuning.jobs.cancel(jobs[0].id),
        lambda: beta.fine_tuning.jobs.list_events(jobs[0].id),
        lambda: beta.fine_tuning.jobs.checkpoints.list(jobs[0].id),
        lambda: beta.fine_tuning.jobs.list(after=jobs[0].id),
    ):
        assert error_of(call)[0] == 404
    assert [e.message for e in acme.fine_tuning.jobs.list_events(jobs[0].id)] == [
        f"Created fine-tuning job: {jobs[0].id}"
    ]
    for job in jobs:  # a cancelled job frees its slot
        assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    status, body = error_of(lambda: acme.fine_tuning.jobs.cancel(jobs[0].id))
    assert status == 400 and "already cancelled" in body["message"]
    assert error_of(lambda: acme.fine_tuning.jobs.resume(jobs[0].id))[0] == 400
    acme.fine_tuning.jobs.cancel(
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id).id
    )


@pytest.mark.integration  # a server on 127.0.0.1
def test_no_key_reaches_the_database_or_storage(api_server):
    c = client(api_server["url"])
    c.files.create(file=("t.jsonl", training_rows(3)), purpose="fine-tune")
    scanned = 0
    for path in api_server["tmp"].rglob("*"):
        if path.is_file() and path.name != "tenants.yaml":
            scanned += 1
            for key in KEYS.values():
                assert key.encode() not in path.read_bytes(), path
    assert scanned >= 2  # the database and a file at least


@pytest.mark.integration  # a server on 127.0.0.1
def test_the_routes_are_404s_without_a_finetuning_section(api_server):
    service = ft_api.installed.service
    ft_api.install(None, None)
    try:
        assert error_of(lambda: client(api_server["url"]).files.list())[0] == 404
    finally:
        ft_api.install(service, Tenants.from_file(api_server["tmp"] / "tenants.yaml"))


def test_a_file_is_checked_row_by_row_naming_the_line(tmp_path, tokenizer):
    from serve.finetuning.validate import InvalidFile, check_file

    good = tmp_path / "good.jsonl"
    good.write_bytes(training_rows(5))
    checked = check_file(str(good), "good.jsonl", "training_file", "sft", tokenizer)
    assert checked.rows == 5 and checked.tokens > 5 * 20
    rows = training_rows(5).decode().splitlines()
    for line, bad, says in (
        (2, "not json", "invalid JSON"),
        (4, '{"messages": [{"role": "user", "content": "hi"}]}', "assistant"),
        (3, '{"text": 7}', "text"),
    ):
        broken = rows.copy()
        broken[line - 1] = bad
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(broken) + "\n")
        with pytest.raises(InvalidFile) as info:
            check_file(str(path), "bad.jsonl", "training_file", "sft", tokenizer)
        assert info.value.error["code"] == "invalid_training_file"
        assert f"bad.jsonl, line {line}" in info.value.error["message"]
        assert says in info.value.error["message"]


def test_dpo_rows_in_openai_format_become_pairs(tmp_path, tokenizer):
    from serve.finetuning.validate import InvalidFile, check_file

    row = {
        "input": {"messages": [{"role": "user", "content": "Review: great. Sentiment?"}]},
        "preferred_output": [{"role": "assistant", "content": "positive"}],
        "non_preferred_output": [{"role": "assistant", "content": "negative"}],
    }
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({"input": {"messages": []}}) + "\n")
    with pytest.raises(InvalidFile) as info:
        check_file(str(path), "pairs.jsonl", "training_file", "dpo", tokenizer)
    assert (
        "pairs.jsonl, line 2: missing field(s) ['preferred_output'" in info.value.error["message"]
    )
    path.write_text(json.dumps(row) + "\n")
    checked = check_file(str(path), "pairs.jsonl", "training_file", "dpo", tokenizer)
    assert checked.pairs == [
        {
            "prompt": row["input"]["messages"],
            "chosen": row["preferred_output"],
            "rejected": row["non_preferred_output"],
        }
    ]


@pytest.mark.integration  # a server on 127.0.0.1
def test_file_bytes_on_s3(s3_server):
    import io

    import boto3

    from serve.finetuning.files import FileStore, TooLarge

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="ft-files")
    store = FileStore("s3://ft-files/tenants")
    size, sha = store.put("acme", "file-1", io.BytesIO(training_rows(4)), max_bytes=1_000_000)
    uri = store.uri("acme", "file-1")
    assert uri == "s3://ft-files/tenants/acme/file-1.jsonl" and size == len(training_rows(4))
    assert b"".join(store.read(uri)) == training_rows(4)
    with pytest.raises(TooLarge):
        store.put("acme", "file-2", io.BytesIO(b"x" * 100), max_bytes=10)
    from core import storage

    assert not storage.exists(store.uri("acme", "file-2"))  # no partial copy left
    store.delete(uri)
    assert not storage.exists(uri)
