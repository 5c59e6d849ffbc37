"""The Serve app end to end with the real openai client on 127.0.0.1: completions, streaming,
tenants, errors, alias moves, 200 concurrent requests over more adapters than the cache holds,
and a registry on an S3 server (moto) started here."""

from __future__ import annotations

import asyncio
import re
import time

import boto3
import httpx
import openai
import pytest
import torch
import yaml
from peft import PeftModel
from ray import serve
from transformers import AutoModelForCausalLM

from jobs.tiny_model import main as build_tiny_model
from serve.app import build_app
from serve.tenants import hash_key
from serve.testing import make_random_adapter
from tests.helpers import start_local_serve
from tests.test_serve_adapters import publish, set_alias

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

V1, V2, V3 = "a1b2c3d4e5f6", "0f0f0f0f0f0f", "123456abcdef"
ACME, BETA, SLOW = "sk-test-acme-key-0001", "sk-test-beta-key-0002", "sk-test-slow-key-0003"
FRUGAL = "sk-test-frugal-key-0004"
POOL = [f"pool-{i}" for i in range(6)]  # more adapters than max_loaded_adapters (2)
MESSAGES = [{"role": "user", "content": "How was the delivery?"}]


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """A registry with versions, aliases and bad adapters, the same files on S3, a tenants file."""
    tmp = tmp_path_factory.mktemp("serve-app")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    made = {
        seed: make_random_adapter(
            tiny_model_dir, tmp / "src" / str(seed), seed=seed, base_model=base
        )
        for seed in range(1, 10)
    }
    root = tmp / "registry"
    publish(root, "support", V1, made[1], "2026-01-01T00:00:00Z")
    publish(root, "support", V2, made[2], "2026-02-01T00:00:00Z")
    set_alias(root, "support", "production", V1)
    publish(root, "sql", V3, made[3])
    for name, seed in zip(POOL, range(4, 10), strict=True):
        publish(root, name, V1, made[seed])
    make_random_adapter(
        tiny_model_dir, root / "wide" / V1, seed=11, r=32, created_at="2026-01-01"
    )  # above max rank
    build_tiny_model(tmp / "other-base", seed=0, hidden=128, layers=2)
    make_random_adapter(tmp / "other-base", root / "foreign" / V1, seed=12, created_at="2026-01-01")

    tenants = tmp / "tenants.yaml"
    tenant_list = [
        {
            "name": "acme",
            "key_sha256": hash_key(ACME),
            "adapters": ["support", "sql", "wide", "foreign", "pool-*", "ghost"],
        },
        {"name": "beta", "key_sha256": hash_key(BETA), "adapters": ["*"]},
        {
            "name": "slow",
            "key_sha256": hash_key(SLOW),
            "adapters": ["*"],
            "requests_per_minute": 2,
        },
        {
            "name": "frugal",
            "key_sha256": hash_key(FRUGAL),
            "adapters": ["*"],
            "tokens_per_minute": 100,
        },
    ]
    tenants.write_text(yaml.safe_dump({"tenants": tenant_list}))
    return {"root": root, "tenants": tenants, "tmp": tmp}


@pytest.fixture(scope="module")
def s3_endpoint(files, s3_server):
    """A copy of the registry on moto's S3 (tests/conftest.py), which sets AWS_ENDPOINT_URL and
    throwaway credentials before Ray starts: the replicas inherit them."""
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="adapters")
    for f in (files["root"] / "support").rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "adapters", f"team/{f.relative_to(files['root'])}")
    return s3_server


@pytest.fixture(scope="module")
def server(files, s3_endpoint, tiny_model_dir):
    """Ray (2 CPUs) and Serve on 127.0.0.1 with two apps: a local registry at / and the S3
    registry at /s3."""
    port = start_local_serve()
    common = {
        "engine": "hf",  # tests/test_serve_vllm.py: the same gateway on vLLM
        "base_model": str(tiny_model_dir),
        "tenants": str(files["tenants"]),
        "max_lora_rank": 16,
        "context_window": 256,
        "max_body_bytes": 4096,
    }
    serve.run(
        build_app(
            {
                **common,
                "registry": str(files["root"]),
                "max_loaded_adapters": 2,
                "max_cpu_adapters": 2,
                "alias_ttl_s": 0.2,
                "max_batch_size": 16,
                "batch_wait_timeout_s": 0.05,
            }
        ),
        name="local",
        route_prefix="/",
    )
    serve.run(
        # Also the overload test's app: 2 requests running, 1 waiting, the rest refused.
        build_app(
            {
                **common,
                "registry": "s3://adapters/team",
                "max_loaded_adapters": 1,
                "adapter_download_dir": str(files["tmp"] / "downloads"),
                "max_batch_size": 2,
                "max_ongoing_requests": 2,
                "max_queued_requests": 1,
            }
        ),
        name="s3",
        route_prefix="/s3",
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def client(server, key=ACME, prefix=""):
    return openai.OpenAI(base_url=f"{server}{prefix}/v1", api_key=key, max_retries=0, timeout=120)


_offline_cache: dict = {}


def offline(tiny_model_dir, tokenizer, adapter_dir, max_tokens=12, messages=MESSAGES, prompt=None):
    """Greedy text from plain transformers + peft, outside the server."""
    key = (str(adapter_dir), max_tokens, str(messages), prompt)
    if key not in _offline_cache:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        if prompt is None:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.eval().generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
            )
        _offline_cache[key] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return _offline_cache[key]


def chat(c, model, **kw):
    kw = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, **kw}
    raw = c.chat.completions.with_raw_response.create(model=model, **kw)
    return raw.parse(), raw.headers


def test_adapters_give_their_own_offline_greedy_outputs(server, files, tiny_model_dir, tokenizer):
    c = client(server)
    support, headers = chat(c, "support")  # the production alias: V1
    assert headers["x-adapter-version"] == V1 and support.model == f"support@{V1}"
    sql, headers = chat(c, "sql")  # no alias: the only version
    assert headers["x-adapter-version"] == V3
    base, headers = chat(client(server, BETA), "base")
    assert headers["x-adapter-version"] == "base"
    texts = [r.choices[0].message.content for r in (support, sql, base)]
    assert texts == [
        offline(tiny_model_dir, tokenizer, files["root"] / "support" / V1),
        offline(tiny_model_dir, tokenizer, files["root"] / "sql" / V3),
        offline(tiny_model_dir, tokenizer, None),
    ]
    assert len(set(texts)) == 3
    assert support.usage.completion_tokens == 12 and support.choices[0].finish_reason == "length"
    assert support.usage.total_tokens == support.usage.prompt_tokens + 12
    pinned, headers = chat(c, f"support@{V2}")
    assert headers["x-adapter-version"] == V2
    assert pinned.choices[0].message.content == offline(
        tiny_model_dir, tokenizer, files["root"] / "support" / V2
    )


def test_completions_endpoint(server, files, tiny_model_dir, tokenizer):
    prompt = "The quick brown fox"
    result = client(server).completions.create(
        model="sql", prompt=prompt, max_tokens=10, temperature=0
    )
    assert result.object == "text_completion"
    assert result.choices[0].text == offline(
        tiny_model_dir, tokenizer, files["root"] / "sql" / V3, max_tokens=10, prompt=prompt
    )
    assert result.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])


def test_streaming_matches_the_whole_answer(server):
    c = client(server)
    whole = chat(c, "sql")[0].choices[0].message.content
    with c.chat.completions.with_streaming_response.create(
        model="sql",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-adapter-version"] == V3
        chunks = list(response.parse())
    content = [
        ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content
    ]
    assert "".join(content) == whole and len(content) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    pieces = c.completions.create(
        model="sql", prompt="The quick", max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(p.choices[0].text for p in pieces)
    at_once = c.completions.create(model="sql", prompt="The quick", max_tokens=8, temperature=0)
    assert streamed == at_once.choices[0].text


def test_models_lists_what_the_tenant_may_use(server):
    acme = {m.id for m in client(server).models.list()}
    beta = {m.id for m in client(server, BETA).models.list()}
    assert acme == {"support", "sql", "wide", "foreign", *POOL}  # "ghost" does not exist
    assert beta == acme | {"base"}


def error_of(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body, info.value.response.headers


def test_client_errors_in_openai_shape(server):
    c = client(server)
    status, body, _ = error_of(lambda: chat(client(server, "sk-wrong"), "support"))
    assert status == 401 and body["code"] == "invalid_api_key" and "sk-wrong" not in str(body)
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "support", "messages": MESSAGES})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

    unknown = error_of(lambda: chat(c, "ghost"))
    not_allowed = error_of(lambda: chat(client(server, ACME), "base"))
    assert unknown[0] == not_allowed[0] == 404
    assert unknown[1]["code"] == not_allowed[1]["code"] == "model_not_found"
    assert unknown[1]["message"].replace("ghost", "X") == not_allowed[1]["message"].replace(
        "base", "X"
    )
    assert error_of(lambda: chat(c, "support@staging"))[0] == 404

    for bad in ("../support", "Support", "support@../../etc"):
        status, body, _ = error_of(lambda bad=bad: chat(c, bad))
        assert (status, body["code"], body["param"]) == (400, "invalid_model_name", "model")

    status, body, _ = error_of(lambda: chat(c, "wide"))
    assert status == 400 and "rank 32, above this server's max_lora_rank 16" in body["message"]
    status, body, _ = error_of(lambda: chat(c, "foreign"))
    assert status == 400 and "trained on base model 'other-base'" in body["message"]

    long = [{"role": "user", "content": "delivery " * 300}]
    status, body, _ = error_of(lambda: chat(c, "support", messages=long))
    assert status == 400 and body["code"] == "context_length_exceeded"
    status, body, _ = error_of(lambda: chat(c, "support", max_tokens=250))
    assert status == 400 and "maximum context length is 256" in body["message"]

    status, body, _ = error_of(lambda: chat(c, "support", temperature=5))
    assert status == 422 and body["param"] == "temperature"
    status, body, _ = error_of(lambda: chat(c, "support", messages=[]))
    assert status == 422 and body["param"] == "messages"


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "param, value",
    [
        ("tools", [TOOL]),
        ("tool_choice", "required"),
        ("parallel_tool_calls", False),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("n", 2),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("logit_bias", {"10": 5}),
    ],
)
def test_the_hf_engine_refuses_what_only_vllm_serves_naming_it(server, param, value):
    status, body, _ = error_of(lambda: chat(client(server), "support", **{param: value}))
    assert (status, body["param"], body["code"]) == (400, param, "unsupported_parameter")
    assert "(hf)" in body["message"] and "engine: vllm" in body["message"]


def test_the_hf_engine_takes_the_defaults_of_what_it_does_not_serve(server):
    defaults = {"n": 1, "logprobs": False, "tool_choice": "none", "presence_penalty": 0}
    assert chat(client(server), "support", **defaults)[0].choices[0].message.content


def test_raw_http_errors(server):
    headers = {"Authorization": f"Bearer {ACME}", "Content-Type": "application/json"}
    url = f"{server}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    big = b'{"model": "support", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
    r = httpx.post(url, content=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(f"{server}/v1/nothing-here", headers=headers)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_rate_limit_is_429_with_retry_after(server):
    c = client(server, SLOW)
    chat(c, "base", max_tokens=2)
    chat(c, "base", max_tokens=2)
    status, body, headers = error_of(lambda: chat(c, "base", max_tokens=2))
    assert status == 429 and body["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 30

    c = client(server, FRUGAL)  # 100 tokens a minute: prompt + max_tokens are reserved up front
    first, _ = chat(c, "base", max_tokens=60)
    assert first.usage.total_tokens <= 100
    status, body, headers = error_of(lambda: chat(c, "base", max_tokens=60))
    assert status == 429 and int(headers["retry-after"]) >= 1
    status, body, _ = error_of(lambda: chat(c, "base", max_tokens=150))
    assert status == 400 and "more than your limit of 100 tokens per minute" in body["message"]


def test_alias_move_is_served_on_the_next_request(server, files, tiny_model_dir, tokenizer):
    c = client(server)
    assert chat(c, "support@production")[1]["x-adapter-version"] == V1
    set_alias(files["root"], "support", "production", V2)
    try:
        time.sleep(0.3)  # the app's alias_ttl_s is 0.2
        moved, headers = chat(c, "support")
        assert headers["x-adapter-version"] == V2
        assert moved.choices[0].message.content == offline(
            tiny_model_dir, tokenizer, files["root"] / "support" / V2
        )
    finally:
        set_alias(files["root"], "support", "production", V1)


def test_200_concurrent_requests_over_more_adapters_than_the_cache(
    server, files, tiny_model_dir, tokenizer
):
    prompts = [[{"role": "user", "content": t}] for t in ("How was the delivery?", "Say hi")]
    models = [*POOL, "base"]
    want = {
        (m, i): offline(
            tiny_model_dir,
            tokenizer,
            None if m == "base" else files["root"] / m / V1,
            6,
            prompts[i],
        )
        for m in models
        for i in range(2)
    }
    jobs = [(models[k % len(models)], k % 2) for k in range(200)]

    async def run_all():
        c = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=BETA, max_retries=0, timeout=300)
        async with c:
            return await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model=m, messages=prompts[i], max_tokens=6, temperature=0
                    )
                    for m, i in jobs
                ),
                return_exceptions=True,
            )

    started = time.time()
    results = asyncio.run(run_all())
    elapsed = time.time() - started
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    wrong = [
        (j, r.choices[0].message.content)
        for j, r in zip(jobs, results, strict=True)
        if r.choices[0].message.content != want[j]
    ]
    assert not wrong, wrong[:3]

    metrics = httpx.get(f"{server}/metrics").text
    evictions = re.search(
        r'rayft_serve_adapter_cache_events_total\{event="eviction"\} (\S+)', metrics
    )
    assert evictions and float(evictions.group(1)) > 0
    batch_count = float(re.search(r"rayft_serve_batch_size_count (\S+)", metrics).group(1))
    batch_sum = float(re.search(r"rayft_serve_batch_size_sum (\S+)", metrics).group(1))
    assert batch_sum / batch_count > 1.5  # requests were batched, not run one by one
    assert 'rayft_serve_requests_total{model="pool-0",status="200"}' in metrics
    print(f"200 requests in {elapsed:.1f}s, mean batch {batch_sum / batch_count:.1f}")


def test_s3_registry(server, files, tiny_model_dir, tokenizer):
    c = client(server, prefix="/s3")
    result, headers = chat(c, "support")
    assert headers["x-adapter-version"] == V1
    assert result.choices[0].message.content == offline(
        tiny_model_dir, tokenizer, files["root"] / "support" / V1
    )
    assert chat(c, f"support@{V2}")[1]["x-adapter-version"] == V2
    assert error_of(lambda: chat(c, "sql"))[0] == 404  # not uploaded to this bucket
    assert (files["tmp"] / "downloads" / "adapters" / "team" / "support" / V1).is_dir()
    assert {m.id for m in c.models.list()} == {"support"}


def test_overload_is_503_in_openai_shape_not_an_error(server):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        f"{server}/s3/v1/chat/completions",
                        headers={"Authorization": f"Bearer {BETA}"},
                        json={"model": "support", "messages": MESSAGES, "max_tokens": 48},
                    )
                    for _ in range(12)
                )
            )

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses  # refused, never failed
    for r in responses:
        if r.status_code == 503:  # the OpenAI error shape, not Serve's plain-text body
            assert r.json()["error"]["code"] == "overloaded", r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert int(r.headers["retry-after"]) >= 1


def test_build_app_refuses_bad_settings():
    with pytest.raises(ValueError, match="tenants: give a tenants file"):
        build_app({"base_model": "x"})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        build_app(
            {
                "base_model": "x",
                "allow_unauthenticated": True,
                "max_batch_size": 32,
                "max_ongoing_requests": 8,
            }
        )
