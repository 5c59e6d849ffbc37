"""jobs.graders: each grader on real inputs (libraries, child processes, a local HTTP endpoint)."""

from __future__ import annotations

import os
import pickle
import secrets
import threading
import time

import pytest
import sacrebleu
from pydantic import BaseModel
from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from core.config import ConfigError, validate
from jobs.graders import Grade, GraderConfig, make_grader, summarize
from tests.helpers import openai_chat_stub


class Job(BaseModel):  # how the trainer's config holds a grader
    grader: GraderConfig


def load(raw: dict):
    return validate(Job, {"grader": raw}, "job.yaml").grader


def sample(output: str, **item) -> dict:
    return {"output_text": output, "item": item}


def check(operation: str, input="{{ sample.output_text }}", reference="{{ item.answer }}") -> dict:
    return {
        "type": "string_check",
        "name": "exact",
        "input": input,
        "reference": reference,
        "operation": operation,
    }


def python(source: str, **extra) -> dict:
    return {"type": "python", "name": "py", "source": source, **extra}


# ---- string_check


@pytest.mark.parametrize(
    "operation, output, answer, expected",
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "Paris ", "Paris", 0.0),
        ("ne", "Paris", "Rome", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "The answer is Paris.", "Paris", 1.0),
        ("like", "the answer is paris.", "Paris", 0.0),  # like is case-sensitive
        ("ilike", "the answer is PARIS.", "Paris", 1.0),
        ("ilike", "the answer is Rome.", "Paris", 0.0),
    ],
)
def test_string_check_operations(operation, output, answer, expected):
    with make_grader(load(check(operation))) as grader:
        [grade] = grader.grade([sample(output, answer=answer)])
    assert grade == Grade(expected, scores={"exact": expected})


def test_string_check_missing_field_is_a_counted_error_not_a_crash():
    grader = make_grader(load(check("eq")))
    grades = grader.grade([sample("4", answer="4"), sample("4", solution="4")])
    assert grades[0].score == 1.0 and grades[0].error is None
    assert grades[1].score == 0.0 and "reference" in grades[1].error and "answer" in grades[1].error
    assert summarize(grades)["grader_errors"] == 1.0


def test_templates_are_sandboxed():
    grader = make_grader(load(check("eq", input="{{ item.__class__.__mro__ }}")))
    [grade] = grader.grade([sample("x", answer="x")])
    assert grade.score == 0.0 and grade.error


# ---- text_similarity


def similarity(metric: str, **extra) -> dict:
    return {
        "type": "text_similarity",
        "name": "sim",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "evaluation_metric": metric,
        **extra,
    }


PARTIAL = (
    "a lazy cat watched the quick brown fox jumps over the dog",  # reordered: every metric differs
    "the quick brown fox jumps over a lazy cat",
)
METRICS = ["fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"]


def expected(metric: str, text: str, ref: str) -> float:
    """The metric from its library, called directly."""
    if metric == "fuzzy_match":
        return fuzz.ratio(text, ref) / 100
    if metric == "bleu":
        return sacrebleu.sentence_bleu(text, [ref]).score / 100
    kind = "rougeL" if metric == "rouge_l" else "rouge" + metric[-1]
    return rouge_scorer.RougeScorer([kind]).score(ref, text)[kind].fmeasure


@pytest.mark.parametrize("metric", METRICS)
def test_text_similarity_metrics(metric):
    grader = make_grader(load(similarity(metric)))
    text, ref = PARTIAL
    identical, disjoint, partial = grader.grade(
        [
            sample(ref, answer=ref),
            sample("xyzzy", answer="banana"),
            sample(text, answer=ref),
        ]
    )
    assert identical.score == pytest.approx(1.0)
    assert disjoint.score == pytest.approx(0.0, abs=1e-6)
    assert 0.05 < partial.score < 0.95
    assert partial.score == pytest.approx(expected(metric, text, ref))
    assert partial.scores == {"sim": partial.score}


def test_text_similarity_pass_threshold_is_metadata():
    grader = make_grader(load(similarity("fuzzy_match", pass_threshold=0.8)))
    near, far = grader.grade([sample("Pariss", answer="Paris"), sample("Parma", answer="Paris")])
    assert near.passed is True and near.score == pytest.approx(fuzz.ratio("Pariss", "Paris") / 100)
    assert far.passed is False and 0 < far.score < 0.8
    assert summarize([near, far])["reward/pass_rate"] == 0.5


# ---- python


GOOD = """
def grade(sample, item):
    return 1.0 if sample["output_text"].strip() == str(item["answer"]) else 0.25
"""


@pytest.mark.integration  # the grader's child process
def test_python_source_grades_a_batch_in_one_child():
    grader = make_grader(load(python(GOOD)))
    try:
        grades = grader.grade(
            [sample("4", answer=4), sample("5", answer=4), sample(" 7 ", answer=7)]
        )
        child = grader._child.proc.pid
        assert [g.score for g in grades] == [1.0, 0.25, 1.0] and all(
            g.error is None for g in grades
        )
        grader.grade([sample("4", answer=4)])
        assert grader._child.proc.pid == child  # kept between grade calls
    finally:
        grader.close()
    assert grader._child is None


@pytest.mark.integration  # the grader's child process
def test_python_function_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_reward(sample, item):\n    return len(sample['output_text']) / 10\n"
    )
    monkeypatch.chdir(tmp_path)
    with make_grader(
        load({"type": "python", "name": "len", "function": "my_rewards:length_reward"})
    ) as grader:
        grades = grader.grade([sample("abcde"), sample("")])
    assert [g.score for g in grades] == [0.5, 0.0]
    with pytest.raises(ConfigError, match=r"grader\.python\.function: .*no function nope"):
        load({"type": "python", "name": "len", "function": "my_rewards:nope"})


@pytest.mark.integration  # the grader's child process
def test_python_errors_score_zero_and_the_batch_goes_on():
    source = """
def grade(sample, item):
    kind = item["kind"]
    if kind == "raise":
        return 1 / 0
    if kind == "text":
        return "high"
    if kind == "nan":
        return float("nan")
    return 1.0
"""
    with make_grader(load(python(source))) as grader:
        grades = grader.grade([sample("", kind=k) for k in ("raise", "text", "nan", "ok")])
    assert [g.score for g in grades] == [0.0, 0.0, 0.0, 1.0]
    assert "ZeroDivisionError" in grades[0].error
    assert "str, not a number" in grades[1].error
    assert "finite" in grades[2].error
    assert grades[3].error is None
    assert summarize(grades)["grader_errors"] == 3.0


@pytest.mark.integration  # the grader's child process
def test_python_timeout_kills_the_child_and_the_next_samples_grade():
    source = """
def grade(sample, item):
    while item.get("hang"):
        pass
    return 1.0
"""
    with make_grader(load(python(source, timeout_s=1))) as grader:
        start = time.monotonic()
        grades = grader.grade([sample(""), sample("", hang=True), sample(""), sample("")])
        elapsed = time.monotonic() - start
    assert [g.score for g in grades] == [1.0, 0.0, 1.0, 1.0]
    assert "timed out after 1 s" in grades[1].error
    assert elapsed < 15


@pytest.mark.integration  # the grader's child process
def test_python_memory_limit_and_a_dead_child_are_errors():
    source = """
import os
def grade(sample, item):
    if item.get("alloc"):
        block = bytearray(2 * 2**30)
        return float(len(block))
    if item.get("die"):
        os._exit(3)
    return 1.0
"""
    with make_grader(load(python(source, memory_mb=256))) as grader:
        grades = grader.grade([sample("", alloc=True), sample("", die=True), sample("")])
    assert [g.score for g in grades] == [0.0, 0.0, 1.0]
    assert "MemoryError" in grades[0].error
    assert "died (exit status 3)" in grades[1].error


@pytest.mark.integration  # the grader's child process
def test_python_child_sees_no_secrets_and_has_its_own_directory(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-aws-secret")
    monkeypatch.setenv("RAYFT_TEST_HF_TOKEN", "fake-hf-token")
    monkeypatch.setenv("RAYFT_TEST_VISIBLE", "yes")  # an ordinary variable does get through
    source = f"""
import os
def grade(sample, item):
    values = set(os.environ.values())
    hidden = "fake-aws-secret" not in values and "fake-hf-token" not in values
    visible = os.environ.get("RAYFT_TEST_VISIBLE") == "yes"
    own_dir = os.getcwd() != {os.getcwd()!r}
    return float(hidden) + 2 * float(visible) + 4 * float(own_dir)
"""
    with make_grader(load(python(source))) as grader:
        [grade] = grader.grade([sample("")])
    assert grade.score == 7.0, grade


@pytest.mark.integration  # the grader's child process
def test_python_grader_pickles_as_its_config():
    grader = make_grader(load(python(GOOD)))
    grader.grade([sample("1", answer=1)])  # a live child must not stop it pickling
    clone = pickle.loads(pickle.dumps(grader))
    try:
        assert clone._child is None and clone.config == grader.config
        assert clone.grade([sample("2", answer=2)])[0].score == 1.0
    finally:
        grader.close()
        clone.close()


# ---- score_model


KEY = "sk-test-" + secrets.token_hex(12)


class Judge:
    """The judge behind a local OpenAI endpoint: the score depends on the user message; it
    records the requests and the most it served at once."""

    requests: list[dict] = []
    in_flight = 0
    most_in_flight = 0
    lock = threading.Lock()

    @classmethod
    def reply(cls, body: dict, headers, path: str):
        keyless = path == "/open/v1/chat/completions"  # a local server that takes no key
        if not keyless and headers.get("Authorization") != f"Bearer {KEY}":
            # Echoes the credentials it got, as a careless server might.
            return 401, {"error": {"message": f"bad key {headers.get('Authorization')}"}}
        with cls.lock:
            cls.requests.append(body)
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
        time.sleep(0.1)  # a request's service time, so that concurrent ones overlap
        with cls.lock:
            cls.in_flight -= 1
        return judge(body["messages"][-1]["content"])


def judge(text: str) -> str:
    if "excellent" in text:
        return '{"score": 0.9}'
    if "fine" in text:
        return "0.5"  # a bare number
    if "overflow" in text:
        return '```json\n{"score": 7}\n```'  # out of range, in a fence
    return "I cannot score this."


@pytest.fixture(scope="module")
def judge_url():
    with openai_chat_stub(Judge.reply) as url:
        yield url


def score_model(url: str, **extra) -> dict:
    return {
        "type": "score_model",
        "name": "judge",
        "model": "judge",
        "input": [
            {
                "role": "user",
                "content": "Rate this answer to {{ item.question }}: {{ sample.output_text }}",
            }
        ],
        "base_url": url,
        "api_key_env": "RAYFT_TEST_JUDGE_KEY",
        "sampling_params": {"temperature": 0, "seed": 3, "max_tokens": 16},
        "max_retries": 0,
        **extra,
    }


@pytest.mark.integration  # a judge server on 127.0.0.1
def test_score_model_against_a_local_endpoint(judge_url, monkeypatch):
    monkeypatch.setenv("RAYFT_TEST_JUDGE_KEY", KEY)
    Judge.requests.clear()
    Judge.most_in_flight = 0
    outputs = ["excellent", "fine", "overflow", "rambling"] * 2
    with make_grader(load(score_model(judge_url, max_concurrency=4))) as grader:
        grades = grader.grade([sample(o, question="2+2?") for o in outputs])
    assert [g.score for g in grades] == [0.9, 0.5, 1.0, 0.0] * 2  # 7 clamped into [0, 1]
    assert 'no {"score": x}' in grades[3].error and grades[0].error is None
    request = Judge.requests[0]
    assert request["model"] == "judge" and request["temperature"] == 0 and request["seed"] == 3
    assert (
        request["messages"][0]["role"] == "system"
        and '{"score": x}' in request["messages"][0]["content"]
    )
    assert "2+2?" in request["messages"][-1]["content"]
    assert Judge.most_in_flight > 1  # the samples were sent concurrently


@pytest.mark.integration  # a judge server on 127.0.0.1
def test_score_model_range_is_the_raw_scale(judge_url, monkeypatch):
    monkeypatch.setenv("RAYFT_TEST_JUDGE_KEY", KEY)
    grader = make_grader(load(score_model(judge_url, range=[0, 10])))
    assert [
        g.score for g in grader.grade([sample(o, question="q") for o in ("excellent", "overflow")])
    ] == [0.9, 7.0]


@pytest.mark.integration  # a judge server on 127.0.0.1
def test_score_model_key_never_leaks(judge_url, monkeypatch):
    cfg = load(score_model(judge_url))
    grader = make_grader(cfg)
    monkeypatch.delenv("RAYFT_TEST_JUDGE_KEY", raising=False)
    [missing] = grader.grade([sample("excellent", question="q")])
    assert missing.score == 0.0 and "RAYFT_TEST_JUDGE_KEY" in missing.error

    wrong = KEY[::-1]  # the server rejects it and echoes it back
    monkeypatch.setenv("RAYFT_TEST_JUDGE_KEY", wrong)
    [rejected] = grader.grade([sample("excellent", question="q")])
    assert rejected.score == 0.0 and "401" in rejected.error and "***" in rejected.error
    monkeypatch.setenv("RAYFT_TEST_JUDGE_KEY", KEY)
    [ok] = grader.grade([sample("excellent", question="q")])
    assert ok.score == 0.9
    for text in (
        rejected.error,
        repr(grader),
        repr(cfg),
        cfg.model_dump_json(),
        str(pickle.dumps(grader)),
    ):
        assert KEY not in text and wrong not in text


@pytest.mark.integration  # a judge server on 127.0.0.1
def test_score_model_without_a_key(judge_url, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = load(score_model(judge_url.replace("/v1", "/open/v1"), api_key_env=None))
    assert [g.score for g in make_grader(cfg).grade([sample("fine", question="q")])] == [0.5]


@pytest.mark.integration  # a judge server on 127.0.0.1
def test_score_model_missing_template_field_is_an_error(judge_url, monkeypatch):
    monkeypatch.setenv("RAYFT_TEST_JUDGE_KEY", KEY)
    [grade] = make_grader(load(score_model(judge_url))).grade([sample("excellent")])
    assert grade.score == 0.0 and "question" in grade.error


# ---- multi


def test_multi_combines_named_graders():
    cfg = load(
        {
            "type": "multi",
            "name": "combined",
            "graders": {"exact": check("eq"), "close": similarity("fuzzy_match")},
            "calculate_output": "0.5 * exact + 0.5 * max(close, 0.2)",
        }
    )
    with make_grader(cfg) as grader:
        right, near, broken = grader.grade(
            [sample("Paris", answer="Paris"), sample("Pariss", answer="Paris"), sample("x")]
        )
    assert right.score == 1.0 and right.scores == {"exact": 1.0, "close": 1.0}
    close = fuzz.ratio("Pariss", "Paris") / 100
    assert near.score == pytest.approx(0.5 * close) and near.scores == {
        "exact": 0.0,
        "close": pytest.approx(close),
    }
    assert broken.score == pytest.approx(0.1) and broken.error.startswith("exact: reference")
    metrics = summarize([right, near, broken])
    assert metrics["reward/exact/mean"] == pytest.approx(1 / 3)
    assert metrics["reward/close/mean"] == pytest.approx((1 + close) / 3)
    assert metrics["reward/mean"] == pytest.approx((1 + 0.5 * close + 0.1) / 3)
    assert metrics["grader_errors"] == 1.0


def test_multi_formula_failing_on_a_sample_is_an_error():
    cfg = load(
        {"type": "multi", "name": "m", "graders": {"a": check("eq")}, "calculate_output": "1 / a"}
    )
    grades = make_grader(cfg).grade([sample("x", answer="x"), sample("x", answer="y")])
    assert grades[0].score == 1.0 and grades[0].error is None
    assert grades[1].score == 0.0 and "calculate_output" in grades[1].error


def test_summarize():
    metrics = summarize(
        [Grade(1.0, scores={"g": 1.0}), Grade(0.0, error="boom", scores={"g": 0.0})]
    )
    assert metrics == {
        "reward/mean": 0.5,
        "reward/std": 0.5,
        "reward/g/mean": 0.5,
        "grader_errors": 1.0,
    }


# ---- configs that fail at load


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"type": "regex", "name": "x"}, r"grader: Input tag 'regex'"),
        (check("glob"), r"grader\.string_check\.operation: Input should be 'eq'"),
        (
            check("eq", reference="{{ item.answer "),
            r"grader\.string_check\.reference: template syntax error on line 1",
        ),
        (check("eq") | {"threshold": 1}, r"unknown key 'grader\.string_check\.threshold'"),
        (
            similarity("meteor"),
            r"grader\.text_similarity\.evaluation_metric: OpenAI's metric 'meteor' is not supported here; use one of fuzzy_match, bleu",
        ),
        (similarity("cosine"), r"evaluation_metric: .*'cosine' is not supported"),
        (python(GOOD, function="my_rewards:grade"), r"grader\.python: give exactly one of source"),
        ({"type": "python", "name": "py"}, r"grader\.python: give exactly one of source"),
        (
            python("def grade(sample, item) return 1"),
            r"grader\.python\.source: syntax error on line 1",
        ),
        (
            python("def score(sample, item):\n    return 1"),
            r"grader\.python\.source: define a top-level `def grade",
        ),
        pytest.param(
            {"type": "python", "name": "py", "function": "no_such_module_here:grade"},
            r"grader\.python\.function: cannot import",
            marks=pytest.mark.integration,  # the import is tried in the grader's child process
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": check("eq"), "b": check("ne")},
                "calculate_output": "a + c",
            },
            r"grader\.multi\.calculate_output: unknown name\(s\) c; the graders are a, b",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": check("eq")},
                "calculate_output": "a.__class__",
            },
            r"grader\.multi\.calculate_output: .*cannot be evaluated",
        ),
        (
            {"type": "multi", "name": "m", "graders": {"a": check("bad")}, "calculate_output": "a"},
            r"grader\.multi\.graders\.a\.string_check\.operation",
        ),
        (
            score_model("http://x/v1", range=[1, 0]),
            r"grader\.score_model\.range: give \[min, max\] with min < max",
        ),
    ],
)
def test_bad_configs_fail_at_load_naming_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        load(raw)


def test_a_key_in_api_key_env_is_refused_without_repeating_it():
    with pytest.raises(ConfigError) as e:
        load(score_model("http://x/v1", api_key_env=KEY))
    assert "api_key_env: give the NAME" in str(e.value) and KEY not in str(e.value)
