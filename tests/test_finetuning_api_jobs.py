"""The fine-tuning API end to end: a real `ray start --head` (token auth, the Jobs API), the
serving app on it (hf engine), jobs as Ray jobs, SQLite, and the real openai client.

One app and one head for the module. Every Ray Train run costs seconds of start-up, so each job
proves as much as it can: the snippet's job is the one that lives through a killed API replica and
a pause and a resume, and is then shared by the tests that read a finished job; the cancel, dpo
and reinforcement jobs are started together so that their start-ups overlap.

A window to act in is made by freezing the job's trainer (SIGSTOP), not by many steps: while it
is frozen the job cannot move on, whatever the machine's speed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
import torch
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from peft import PeftModel
from ray import serve
from ray.job_submission import JobSubmissionClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.app import build_app
from serve.finetuning import db
from tests.helpers import REPO, free_port, wait_for
from tests.test_finetuning_api import (
    KEYS,
    client,
    ray_head,
    settings,
    training_rows,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = [
    {
        "role": "system",
        "content": "Classify the sentiment of the review as positive, negative or mixed.",
    },
    {"role": "user", "content": "Review: The battery is excellent and the screen is bright."},
]


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ftapi")
    with ray_head() as dashboard:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = settings(tmp, tiny_model_dir, dashboard)
        serve.run(build_app(args), name="ft", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}/v1", "tmp": tmp, "settings": args}
        serve.shutdown()


def upload(c, data: bytes, name: str = "train.jsonl"):
    return c.files.create(file=(name, data), purpose="fine-tune")


def finished(c, job_id: str, timeout: float = 900):
    # generous: on 2 busy CPUs a 2-step job has taken 3.5 min end to end
    def done():
        job = c.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, f"job {job_id} to finish", every=0.5)


def has_event(c, job_id: str, prefix: str) -> bool:
    return any(e.message.startswith(prefix) for e in c.fine_tuning.jobs.list_events(job_id))


def replica_pids(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    # this head's, by address: other Ray clusters may run on the machine
    actors = list_actors(
        address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000
    )
    return [a.pid for a in actors if "MultiAdapterServer" in (a.class_name or "")]


def trainer_pid(dashboard: str, ray_jobs: JobSubmissionClient, submission_id: str) -> int:
    """The pid of the Ray Train worker of one Ray job (one worker a run), once it runs."""
    from ray.util.state import list_actors

    def pids():
        driver = ray_jobs.get_job_info(submission_id).driver_info
        if driver is None:
            return None
        actors = list_actors(
            address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000
        )
        return [
            a.pid
            for a in actors
            if a.class_name == "RayTrainWorker" and a.job_id == driver.id and a.pid
        ]

    (pid,) = wait_for(pids, 300, f"the Ray Train worker of {submission_id}")
    return pid


def thaw(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has ended
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def malformed(app):
    """A job on a file whose third line is cut short, created before the snippet's job (see
    `trained`): it fails in validation, while the snippet's job starts."""
    c = client(app["url"])
    rows = training_rows(40).decode().splitlines()
    rows[2] = '{"messages": [{"role": "user", "content": "no answer"'
    f = upload(c, ("\n".join(rows) + "\n").encode(), "bad.jsonl")
    return c.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)


@pytest.fixture(scope="module")
def trained(app, request, malformed):
    """README's snippet (upload, create with 3 epochs, list events, retrieve, chat), and the job
    lives through an API replica killed mid-run, then a pause and a resume (from its checkpoint)
    handled by the new replica. Beside it, a second job whose cancel the API wrote down but died
    before passing on to Ray. What happened on the way is returned for the tests to check.

    `malformed`'s job is created first only so that its short life overlaps this one's start."""
    c = client(app["url"])
    dashboard = app["settings"]["finetuning"]["ray_address"]
    ray_jobs = JobSubmissionClient(dashboard)
    sessions = db.connect(app["settings"]["finetuning"]["database_url"])
    seen = {}
    t0 = time.time()
    f = upload(c, training_rows(128))
    job = c.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=f.id,
        suffix="reviews",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    )
    trainer = trainer_pid(dashboard, ray_jobs, f"{job.id}-0")
    # A second job whose cancel the API writes down but dies before passing on to Ray. Started
    # once the first one trains, so that its start-up overlaps the first one's steps, not its
    # start-up (it only has to be running when the API dies).
    other = c.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=f.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 200}}},
    )
    # whatever happens here, its 200 epochs must not slow the tests after this one
    request.addfinalizer(lambda: ray_jobs.stop_job(f"{other.id}-0"))
    wait_for(lambda: has_event(c, job.id, "Checkpoint created"), 300, "a checkpoint")
    # Frozen mid-run: from here until it is let go, the job takes no step, so the restart and
    # the pause below land mid-run however fast the machine is (the test checks it: the resumed
    # run starts before the last step). Ray Train's controller waits 10 min before it calls a
    # silent worker dead.
    os.kill(trainer, signal.SIGSTOP)
    request.addfinalizer(lambda: thaw(trainer))
    wait_for(lambda: c.fine_tuning.jobs.retrieve(other.id).status == "running", 240, "running")
    assert c.fine_tuning.jobs.retrieve(job.id).status == "running"
    (pid,) = replica_pids(dashboard)
    os.kill(pid, signal.SIGKILL)  # the API process, at any moment: no shutdown hook runs
    # written while no replica runs (a new one takes seconds to start): only the new replica's
    # reconciler can stop this Ray job
    seen["other_cancel_written"] = db.set_status(
        sessions, other.id, "cancelled", only_from=("running",), stop_pending=True
    )

    def answers():
        try:
            return c.fine_tuning.jobs.retrieve(job.id)
        except Exception:
            return None

    seen["after_restart"] = wait_for(answers, 180, "a new API replica").status
    seen["killed"], seen["replicas"] = pid, replica_pids(dashboard)
    # pause (the new replica), see the Ray job stop, resume
    seen["pause"] = c.fine_tuning.jobs.pause(job.id).status
    wait_for(
        lambda: ray_jobs.get_job_status(f"{job.id}-0").value in ("STOPPED", "FAILED"),
        120,
        "the paused job's Ray job to stop",
    )
    thaw(trainer)  # its run has ended: let it go, and see it exit
    wait_for(lambda: gone(trainer), 120, "the paused run's worker to exit")
    seen["paused"] = c.fine_tuning.jobs.retrieve(job.id).status
    seen["resume"] = c.fine_tuning.jobs.resume(job.id).status
    job = finished(c, job.id)
    print(f"the snippet's job took {time.time() - t0:.1f} s")
    return {"job": job, "file": f, "other": other, "seen": seen, "sessions": sessions}


def test_the_snippet_job_succeeds_and_its_model_answers_like_its_adapter(
    app, trained, tiny_model_dir
):
    job = trained["job"]
    assert job.status == "succeeded", job.error
    FineTuningJob.model_validate(job.model_dump())
    assert job.fine_tuned_model == f"ft:tiny-llama:acme:reviews:{job.id.removeprefix('ftjob-')}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.method.supervised.hyperparameters.n_epochs == 3
    assert job.result_files and job.finished_at >= job.created_at
    c = client(app["url"])
    csv = c.files.content(job.result_files[0]).read().decode()
    assert csv.splitlines()[0] == "step,train_loss,valid_loss,learning_rate"
    steps = len(csv.splitlines()) - 1
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id)]
    assert any("successfully completed" in m for m in messages)
    # validating_files -> queued -> running -> succeeded, in the events' order (oldest first)
    order = [
        next(i for i, m in enumerate(reversed(messages)) if m.startswith(prefix))
        for prefix in (
            "Validating training file",
            "Fine-tuning job queued",
            "Fine-tuning job started",
            "Step 1:",
            "Evaluation gate passed",
            "The job has successfully completed",
        )
    ]
    assert order == sorted(order), messages
    assert any(m.startswith(f"Step {steps}:") for m in messages)
    # served at once by the same endpoint, for its tenant, with the registry version's header
    assert job.fine_tuned_model in [m.id for m in c.models.list()]
    raw = c.chat.completions.with_raw_response.create(
        model=job.fine_tuned_model, messages=MESSAGES, max_tokens=8, temperature=0
    )
    reply = raw.parse()
    assert reply.model == job.fine_tuned_model
    assert raw.headers["x-adapter-version"]
    adapter = app["tmp"] / "registry" / job.id / raw.headers["x-adapter-version"]
    assert reply.choices[0].message.content == offline(tiny_model_dir, adapter, MESSAGES, 8)
    # the answer is the adapter's, not the base's (beta may use the base; acme may not)
    base = client(app["url"], "beta").chat.completions.create(
        model="base", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert base.choices[0].message.content == offline(tiny_model_dir, None, MESSAGES, 8)
    assert base.choices[0].message.content != reply.choices[0].message.content


def offline(tiny_model_dir, adapter_dir, messages, max_tokens: int) -> str:
    """Greedy text from plain transformers + peft on the trained adapter, outside the server."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.eval().generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_checkpoints_are_listed_and_servable(app, trained):
    c = client(app["url"])
    job = trained["job"]
    checkpoints = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints, "no checkpoint recorded"
    for ckpt in checkpoints:
        FineTuningJobCheckpoint.model_validate(ckpt.model_dump())
        assert ckpt.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{ckpt.step_number}")
        assert ckpt.metrics.train_loss is not None
    steps = [c.step_number for c in checkpoints]
    assert steps == sorted(steps, reverse=True)
    first = checkpoints[-1]
    raw = c.chat.completions.with_raw_response.create(
        model=first.fine_tuned_model_checkpoint, messages=MESSAGES, max_tokens=4
    )
    assert raw.headers["x-adapter-version"]


def test_events_paginate_without_duplicates(app, trained):
    c = client(app["url"])
    job_id = trained["job"].id
    everything = c.fine_tuning.jobs.list_events(job_id, limit=100).data
    pages, after = [], None
    while True:
        page = c.fine_tuning.jobs.list_events(
            job_id, limit=3, **({"after": after} if after else {})
        )
        pages += page.data
        if not page.has_more:
            break
        after = page.data[-1].id
    assert [e.id for e in pages] == [e.id for e in everything]
    assert len({e.message for e in everything}) == len(everything)  # nothing twice
    for e in everything:
        FineTuningJobEvent.model_validate(e.model_dump())
    # newest first; the stream gives the same events oldest first, then ends (the job ended)
    import httpx

    with httpx.stream(
        "GET",
        f"{app['url']}/fine_tuning/jobs/{job_id}/events",
        params={"stream": "true"},
        headers={"Authorization": f"Bearer {KEYS['acme']}"},
        timeout=60,
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    streamed = [json.loads(line[6:])["id"] for line in lines[:-1]]
    assert streamed == [e.id for e in reversed(everything)]


def test_other_tenants_see_none_of_it(app, trained):
    acme, beta = client(app["url"]), client(app["url"], "beta")
    job, f = trained["job"], trained["file"]
    checks = [
        lambda: beta.fine_tuning.jobs.retrieve(job.id),
        lambda: beta.fine_tuning.jobs.cancel(job.id),
        lambda: beta.fine_tuning.jobs.pause(job.id),
        lambda: beta.fine_tuning.jobs.list_events(job.id),
        lambda: beta.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: beta.files.retrieve(f.id),
        lambda: beta.files.content(f.id),
        lambda: beta.files.delete(f.id),
        lambda: beta.files.content(job.result_files[0]),
        lambda: beta.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES),
        # the registry name behind it, for a tenant whose allow-list is "*"
        lambda: beta.chat.completions.create(model=job.id, messages=MESSAGES),
    ]
    for check in checks:
        with pytest.raises(openai_not_found()):
            check()
    assert job.fine_tuned_model not in [m.id for m in beta.models.list()]
    assert job.id not in [m.id for m in beta.models.list()]
    assert job.id not in [j.id for j in beta.fine_tuning.jobs.list()]
    assert f.id not in [x.id for x in beta.files.list()]
    assert job.id in [j.id for j in acme.fine_tuning.jobs.list()]
    FileObject.model_validate(acme.files.retrieve(f.id).model_dump())


def openai_not_found():
    import openai

    return openai.NotFoundError


def test_a_malformed_file_fails_the_job_naming_the_line(app, malformed):
    c = client(app["url"])
    job = finished(c, malformed.id, timeout=240)
    assert job.status == "failed"
    assert job.error.code == "invalid_training_file"
    assert job.error.param == "training_file"
    assert "bad.jsonl, line 3" in job.error.message
    assert job.fine_tuned_model is None


def test_the_api_killed_mid_job_restarts_then_the_job_pauses_resumes_and_succeeds(app, trained):
    """The snippet's job lived through an API replica killed mid-run, then a pause and a resume
    (from its checkpoint) handled by the new replica (the `trained` fixture)."""
    c, job, seen = client(app["url"]), trained["job"], trained["seen"]
    assert seen["killed"] not in seen["replicas"] and len(seen["replicas"]) == 1
    assert seen["after_restart"] == "running"  # the new replica left the running job alone
    assert (seen["pause"], seen["paused"], seen["resume"]) == ("paused", "paused", "queued")
    assert job.status == "succeeded", job.error
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]  # all pages
    assert "Fine-tuning job started (resumed)" in messages
    assert len(messages) == len(set(messages)), "an event written twice"
    steps = [m for m in messages if m.startswith("Step ")]
    csv = c.files.content(job.result_files[0]).read().decode().splitlines()
    assert len(steps) == len(csv) - 1  # every step once
    assert sum("successfully completed" in m for m in messages) == 1
    run = json.loads((app["tmp"] / "runs" / job.id / "run.json").read_text())
    # from its checkpoint (one every 4 steps), and before the last step: the pause was mid-run
    assert 4 <= run["resumed_at_steps"][0] < len(csv) - 1, run["resumed_at_steps"]
    # the new replica's reconciler stopped the cancelled job's Ray job
    other = trained["other"]
    assert seen["other_cancel_written"]
    ray_jobs = JobSubmissionClient(app["settings"]["finetuning"]["ray_address"])
    wait_for(
        lambda: ray_jobs.get_job_status(f"{other.id}-0").value in ("STOPPED", "FAILED"),
        120,
        "the cancelled job's Ray job to be stopped after the restart",
    )
    sessions = trained["sessions"]
    wait_for(lambda: not db.get_job(sessions, other.id).stop_pending, 60, "stop_pending cleared")
    after = c.fine_tuning.jobs.retrieve(other.id)
    assert after.status == "cancelled" and after.fine_tuned_model is None


def test_no_key_is_written_anywhere(app, trained):
    for path in app["tmp"].rglob("*"):
        if path.is_file() and path.name != "tenants.yaml":
            data = path.read_bytes()
            for key in KEYS.values():
                assert key.encode() not in data, path


@pytest.fixture(scope="module")
def side_jobs(app, request):
    """Three jobs created together (the tenant's limit), so that their start-ups overlap: a long
    one to cancel mid-run, a dpo one and a reinforcement one."""
    from jobs.demo_data import make_prompt_rows

    c = client(app["url"])
    ray_jobs = JobSubmissionClient(app["settings"]["finetuning"]["ray_address"])
    long = c.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=upload(c, training_rows(128)).id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 200}}},
        # a step event as soon as the first step is checkpointed
        extra_body={"rayft": {"checkpoint_every_steps": 1, "eval_every_steps": 10}},
    )
    # whatever happens, its 200 epochs must not slow the other jobs
    request.addfinalizer(lambda: ray_jobs.stop_job(f"{long.id}-0"))
    rows = []
    for line in (REPO / "data/review_pairs.jsonl").read_text().splitlines()[:32]:
        pair = json.loads(line)
        rows.append(
            {
                "input": {"messages": pair["prompt"]},
                "preferred_output": pair["chosen"],
                "non_preferred_output": pair["rejected"],
            }
        )
    f = upload(c, "".join(json.dumps(r) + "\n" for r in rows).encode(), "pairs.jsonl")
    dpo = c.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=f.id,
        suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
    )
    rows = "".join(json.dumps(r) + "\n" for r in make_prompt_rows(24)).encode()
    f = upload(c, rows, "prompts.jsonl")
    grader = {
        "type": "string_check",
        "name": "label",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "operation": "eq",
    }
    rft = c.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=f.id,
        suffix="rft",
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": {"batch_size": 4}},
        },
        extra_body={"rayft": {"max_steps": 2}},
    )
    return {"long": long, "dpo": dpo, "rft": rft}


def test_cancel_mid_run_stops_its_ray_job(app, side_jobs):
    c = client(app["url"])
    job = side_jobs["long"]
    wait_for(lambda: has_event(c, job.id, "Step "), 300, "a training step event")
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    jobs = JobSubmissionClient(app["settings"]["finetuning"]["ray_address"])
    wait_for(
        lambda: jobs.get_job_status(f"{job.id}-0").value in ("STOPPED", "FAILED"),
        120,
        "the cancelled job's Ray job to stop",
    )
    # the status is read again, after the Ray job has gone
    after = c.fine_tuning.jobs.retrieve(job.id)
    assert after.status == "cancelled" and after.fine_tuned_model is None
    with pytest.raises(openai_not_found()):
        c.chat.completions.create(
            model=f"ft:tiny-llama:acme::{job.id.removeprefix('ftjob-')}", messages=MESSAGES
        )


def test_a_dpo_job_on_openai_preference_rows(app, side_jobs):
    c = client(app["url"])
    job = side_jobs["dpo"]
    assert job.method.dpo.hyperparameters.beta == 0.2
    job = finished(c, job.id)
    assert job.status == "succeeded", job.error
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=100))
    warned = [e for e in events if e.level == "warn"]
    assert [e.message for e in warned] == [
        "Promoted without an evaluation gate (dpo: no built-in gate)"
    ]
    reply = c.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, max_tokens=4)
    assert reply.model == job.fine_tuned_model


def test_a_reinforcement_job_on_prompt_rows_with_a_grader(app, side_jobs):
    """method reinforcement: OpenAI's RFT rows (messages up to the user's turn, an `answer`
    field) and a string_check grader train GRPO; the model is served to its tenant."""
    c = client(app["url"])
    job = side_jobs["rft"]
    assert job.method.type == "reinforcement"
    assert job.method.reinforcement.grader.reference == "{{ item.answer }}"
    job = finished(c, job.id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Promoted without an evaluation gate (reinforcement: no built-in gate)" in messages
    reply = c.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, max_tokens=4)
    assert reply.model == job.fine_tuned_model
