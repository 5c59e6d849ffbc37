"""jobs.prepare: a messy export with known counts, every dropped row accounted for, determinism,
each input format and field mapping, s3:// input, the judge scorer, weights, and the job reading
a prepared set."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from core.config import ConfigError
from jobs.config import DataConfig, load_config
from jobs.data.prepare import (
    PrepareConfig,
    load_prepare_config,
    prepare,
    prepare_data,
    read_manifest,
    read_split,
)
from jobs.demo_data import make_rows, write_jsonl
from tests.helpers import REPO, openai_chat_stub

MESSY = REPO / "tests/fixtures/messy"
PREPARE_MESSY = [sys.executable, "-m", "jobs.prepare", "tests/fixtures/messy/prepare.yaml"]
# What the messy fixture holds (tests/fixtures/messy/make_messy.py says which line is what)
MESSY_COUNTS = {
    "input_rows": 64,
    "malformed": 9,
    "exact_duplicates": 5,
    "near_duplicates": 3,
    "too_short": 2,
    "too_long": 2,
    "low_quality": 2,
    "train": 38,
    "eval": 3,
    "test": 0,
    "leakage_prevented": 1,
}


def prepare_quietly(data: DataConfig, output: Path, tokenizer, **settings):
    cfg = PrepareConfig(data=data, tokenizer="t", output=str(output), **settings)
    return prepare(cfg, tokenizer=tokenizer, show_progress=False)


def messy_config(tmp_path, **data_overrides) -> PrepareConfig:
    cfg = load_prepare_config(MESSY / "prepare.yaml", [f"output={tmp_path / 'out'}"])
    data = cfg.data.model_copy(update=data_overrides)
    return cfg.model_copy(update={"data": data})


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("messy")
    cfg = messy_config(out)
    return prepare(cfg, tokenizer=tokenizer, show_progress=False), out / "out"


def test_messy_export_counts_are_exact(messy):
    manifest, _ = messy
    counts = manifest.counts
    assert {k: counts[k] for k in MESSY_COUNTS} == MESSY_COUNTS
    assert counts["malformed_by_reason"] == {
        "invalid JSON": 2,
        "unknown role": 1,
        "no assistant turn": 1,
        "roles out of order": 1,
        "not a string": 1,
        "unknown format": 1,
        "empty content": 1,
        "invalid UTF-8": 1,
    }
    assert counts["train_eval_overlap"] == 0


def test_every_dropped_row_is_accounted_for_with_file_and_line(messy):
    manifest, out = messy
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == sum(
        manifest.counts[k]
        for k in (
            "malformed",
            "exact_duplicates",
            "near_duplicates",
            "too_short",
            "too_long",
            "low_quality",
        )
    )
    by_where = {d["where"]: d for d in dropped}
    export = "tests/fixtures/messy/export.jsonl"
    assert by_where[f"{export}:31"]["reason"].startswith("invalid JSON")
    assert by_where[f"{export}:33"]["reason"] == "messages[1]: unknown role 'bot'"
    assert by_where[f"{export}:53"]["reason"] == "invalid UTF-8 at byte 47"
    # the train copy of a held-out row goes, the held-out row stays
    assert by_where[f"{export}:7"] == {
        "where": f"{export}:7",
        "stage": "exact_duplicates",
        "reason": "exact duplicate",
        "duplicate_of": "tests/fixtures/messy/held_out.jsonl:3",
    }
    assert by_where[f"{export}:43"]["duplicate_of"] == f"{export}:42"  # NFD copy of an NFC row
    assert by_where[f"{export}:41"]["duplicate_of"] == f"{export}:3"  # whitespace-only change
    assert {by_where[f"{export}:{n}"]["stage"] for n in (44, 45, 46)} == {"near_duplicates"}
    assert by_where[f"{export}:49"]["reason"].endswith("tokens > data.length.max_tokens=400")
    assert by_where[f"{export}:51"]["reason"] == "quality 0.05 (repetitive answer)"
    assert by_where[f"{export}:52"]["reason"].endswith("(non-text characters)")
    # kept + dropped = every input row, each exactly once
    kept = [w for s in ("train", "eval") for w, _ in read_split(str(out), s)]
    assert len(kept) + len(dropped) == manifest.counts["input_rows"]
    assert not set(kept) & set(by_where)
    assert manifest.data["errors"][0]["where"] == f"{export}:31"


def test_manifest_records_sources_config_and_formats(messy):
    manifest, out = messy
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["dataset_hash"] == manifest.dataset_hash
    assert on_disk["dataset_hash"].startswith("sha256:")
    sources = on_disk["sources"]
    assert [s["files"][0]["rows"] for s in sources] == [53, 3, 5, 3]
    assert sources[0]["files"][0]["sha256"].startswith("sha256:")
    assert on_disk["config"]["data"]["length"] == {"min_tokens": 24, "max_tokens": 400}
    train = pq.read_table(out / "train.parquet")
    assert train.column_names == ["messages", "text", "source", "where", "num_tokens", "score"]
    rows = train.to_pylist()
    # ShareGPT with a renamed column and Alpaca from CSV with a renamed column came through
    sharegpt = [r for r in rows if r["source"] == 2]
    alpaca = [r for r in rows if r["source"] == 3]
    assert len(sharegpt) == 5 and len(alpaca) == 3
    assert [m["role"] for m in sharegpt[0]["messages"]] == ["user", "assistant"]
    assert alpaca[0]["where"] == "tests/fixtures/messy/alpaca.csv:line 2"


def test_same_input_same_hash_and_any_change_a_new_one(tmp_path, tokenizer, messy):
    manifest, _ = messy
    again = prepare(messy_config(tmp_path / "a"), tokenizer=tokenizer, show_progress=False)
    assert again.dataset_hash == manifest.dataset_hash
    # one character in one kept row
    copy = tmp_path / "copy"
    shutil.copytree(MESSY, copy)
    lines = (copy / "export.jsonl").read_bytes().split(b"\n")
    lines[9] = lines[9].replace(b'."}]}', b'!"}]}')
    (copy / "export.jsonl").write_bytes(b"\n".join(lines))
    cfg = messy_config(tmp_path / "b")
    sources = [
        s.model_copy(update={"path": s.path.replace(str(MESSY.relative_to(REPO)), str(copy))})
        for s in cfg.data.sources
    ]
    changed = prepare(
        cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources})}),
        tokenizer=tokenizer,
        show_progress=False,
    )
    assert changed.counts["train"] == manifest.counts["train"]
    assert changed.dataset_hash != manifest.dataset_hash
    # a prep setting that changes nothing in the rows still changes the hash
    looser = messy_config(tmp_path / "c", length=manifest_length(max_tokens=5000))
    other = prepare(looser, tokenizer=tokenizer, show_progress=False)
    assert other.counts["too_long"] == 0 and other.dataset_hash != manifest.dataset_hash


def manifest_length(**kw):
    from jobs.config import LengthConfig

    return LengthConfig(**{"min_tokens": 24, "max_tokens": 400, **kw})


def test_on_error_fail_names_the_first_bad_row(tmp_path, tokenizer):
    cfg = messy_config(tmp_path, on_error="fail")
    with pytest.raises(ConfigError, match=r"export.jsonl:31: invalid JSON .*data.on_error=fail"):
        prepare(cfg, tokenizer=tokenizer, show_progress=False)


# ---------------------------------------------------------------- formats, inputs


def conversation(i: int) -> tuple[str, str]:
    rows = make_rows(60, seed=11)
    m = rows[i]["messages"]
    return m[1]["content"], m[2]["content"]


def write_all_formats(root: Path) -> dict[str, int]:
    """The same kind of rows in every format and container; returns rows per path."""
    root.mkdir(parents=True)
    (root / "nested").mkdir()
    qa = [conversation(i) for i in range(30)]
    write_jsonl(
        root / "messages.jsonl",
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in qa[0:5]
        ],
    )
    (root / "sharegpt.json").write_text(
        json.dumps(
            [
                {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                for q, a in qa[5:10]
            ]
        )
    )
    pq.write_table(
        pa.table({"instruction": [q for q, _ in qa[10:15]], "output": [a for _, a in qa[10:15]]}),
        root / "alpaca.parquet",
    )
    with open(root / "nested" / "pc.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerows(qa[15:20])
    write_jsonl(root / "nested" / "text.jsonl", [{"body": f"{q} {a}"} for q, a in qa[20:25]])
    from datasets import Dataset

    Dataset.from_dict(
        {"question": [q for q, _ in qa[25:30]], "answer": [a for _, a in qa[25:30]]}
    ).save_to_disk(str(root / "saved"))
    return qa


def lenient_data(sources, **kw) -> DataConfig:
    return DataConfig(
        sources=sources, eval_fraction=0.2, length={"min_tokens": 0}, dedup={"near": False}, **kw
    )


def test_every_format_and_container_with_field_mapping(tmp_path, tokenizer):
    qa = write_all_formats(tmp_path / "in")
    sources = [
        {"path": str(tmp_path / "in/*.json*")},  # glob: messages.jsonl + sharegpt.json
        {"path": str(tmp_path / "in/alpaca.parquet"), "format": "alpaca"},
        {"path": str(tmp_path / "in/nested/pc.csv")},
        {
            "path": str(tmp_path / "in/nested/text.jsonl"),
            "format": "text",
            "fields": {"text": "body"},
        },
        {
            "path": str(tmp_path / "in/saved"),
            "format": "prompt_completion",
            "fields": {"prompt": "question", "completion": "answer"},
        },
    ]
    cfg = PrepareConfig(data=lenient_data(sources), tokenizer="t", output=str(tmp_path / "out"))
    manifest = prepare(cfg, tokenizer=tokenizer, show_progress=False)
    assert manifest.counts["input_rows"] == 30 and manifest.counts["malformed"] == 0
    rows = [e for s in ("train", "eval") for _, e in read_split(str(tmp_path / "out"), s)]
    chats = {
        (e["messages"][0]["content"], e["messages"][1]["content"]) for e in rows if "messages" in e
    }
    texts = {e["text"] for e in rows if "text" in e}
    assert chats == set(qa[:20] + qa[25:30])
    assert texts == {f"{q} {a}" for q, a in qa[20:25]}
    assert [len(s["files"]) for s in manifest.data["sources"]] == [2, 1, 1, 1, 1]


def test_a_directory_source_reads_every_data_file_in_it(tmp_path, tokenizer):
    write_all_formats(tmp_path / "in")
    (tmp_path / "in/notes.txt").write_text("not data")
    cfg = PrepareConfig(
        data=lenient_data([{"path": str(tmp_path / "in/nested")}], format="auto"),
        tokenizer="t",
        output=str(tmp_path / "o"),
    )
    manifest = prepare(cfg, tokenizer=tokenizer, show_progress=False)
    # pc.csv (prompt/completion) and text.jsonl, whose `body` column no format knows
    assert manifest.counts["input_rows"] == 10
    assert manifest.counts["malformed_by_reason"] == {"unknown format": 5}


def test_a_source_with_no_data_files_is_a_config_error(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    cfg = PrepareConfig(
        data=lenient_data([{"path": str(tmp_path / "empty")}]),
        tokenizer="t",
        output=str(tmp_path / "o"),
    )
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path .*: no .jsonl"):
        prepare(cfg, tokenizer=tokenizer, show_progress=False)


@pytest.mark.integration
def test_s3_sources_and_output_through_a_real_s3_server(s3_server, tmp_path, tokenizer, messy):
    manifest, _ = messy
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="raw")
    s3.create_bucket(Bucket="prepared")
    for f in MESSY.iterdir():
        s3.upload_file(str(f), "raw", f"messy/{f.name}")
    cfg = messy_config(tmp_path)
    sources = [
        s.model_copy(update={"path": "s3://raw/messy/" + Path(s.path).name})
        for s in cfg.data.sources
    ]
    cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"sources": sources}),
            "output": "s3://prepared/messy/v1",
        }
    )
    remote = prepare(cfg, tokenizer=tokenizer, show_progress=False)
    assert {k: remote.counts[k] for k in MESSY_COUNTS} == MESSY_COUNTS
    assert remote.dataset_hash == manifest.dataset_hash  # where the files live is not content
    assert read_manifest("s3://prepared/messy/v1")["dataset_hash"] == manifest.dataset_hash
    assert len(read_split("s3://prepared/messy/v1", "train")) == MESSY_COUNTS["train"]
    dropped = s3.get_object(Bucket="prepared", Key="messy/v1/dropped.jsonl")["Body"].read()
    assert b"s3://raw/messy/export.jsonl:31" in dropped


# ---------------------------------------------------------------- dedup across splits, splits, weights


def test_a_near_copy_of_a_held_out_row_is_removed_from_train(tmp_path, tokenizer):
    rows = make_rows(40, seed=5)
    held = [rows[0], rows[1]]
    near = json.loads(json.dumps(rows[0]))
    near["messages"][1]["content"] = near["messages"][1]["content"].replace(".", "!", 1)
    write_jsonl(tmp_path / "train.jsonl", rows[2:] + [near])
    write_jsonl(tmp_path / "held.jsonl", held)
    data = DataConfig(
        train_files=[str(tmp_path / "train.jsonl")],
        eval_files=[str(tmp_path / "held.jsonl")],
        length={"min_tokens": 0},
        dedup={"threshold": 0.7},
    )
    manifest = prepare_quietly(data, tmp_path / "o", tokenizer)
    assert manifest.counts["near_duplicates"] >= 1 and manifest.counts["leakage_prevented"] >= 1
    dropped = [json.loads(x) for x in (tmp_path / "o/dropped.jsonl").read_text().splitlines()]
    assert {
        "where": f"{tmp_path}/train.jsonl:39",
        "stage": "near_duplicates",
        "reason": "near duplicate",
        "duplicate_of": f"{tmp_path}/held.jsonl:1",
    } in dropped
    assert manifest.counts["eval"] == 2


def test_hash_split_with_test_split_is_stable_when_rows_are_added(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, make_rows(200, seed=1))
    data = lenient_data([{"path": str(path)}], test_fraction=0.1)
    first = prepare_quietly(data, tmp_path / "a", tokenizer, seed=3)
    assert 10 <= first.counts["eval"] <= 70 and 5 <= first.counts["test"] <= 40
    write_jsonl(path, make_rows(200, seed=1) + make_rows(100, seed=2))
    prepare_quietly(data, tmp_path / "b", tokenizer, seed=3)
    for split in ("eval", "test"):
        before = {w for w, _ in read_split(str(tmp_path / "a"), split)}
        after = {w for w, _ in read_split(str(tmp_path / "b"), split)}
        assert before <= after  # no held-out row moved
    prepare_quietly(data, tmp_path / "c", tokenizer, seed=4)
    assert {w for w, _ in read_split(str(tmp_path / "c"), "eval")} != {
        w for w, _ in read_split(str(tmp_path / "a"), "eval")
    }


def test_source_weights_repeat_or_thin_training_rows(tmp_path, tokenizer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, make_rows(100, seed=1))
    write_jsonl(b, make_rows(100, seed=2))
    data = lenient_data([{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}])
    m = prepare_quietly(data, tmp_path / "o", tokenizer)
    train = pq.read_table(tmp_path / "o/train.parquet").column("source").to_pylist()
    from_a, from_b = train.count(0), train.count(1)
    unique_a = len({w for w, _ in read_split(str(tmp_path / "o"), "train") if w.startswith(str(a))})
    assert from_a == 2 * unique_a
    assert 20 <= from_b <= 60  # a stable half of b's ~80 training rows
    assert m.counts["train"] == from_a + from_b and m.counts["weighted_out"] > 0


# ---------------------------------------------------------------- quality: the judge


def grade_mixed_low(body: dict, headers: dict, path: str) -> str:
    """The stub judge: "mixed" answers get a 2, the rest a 9; it records the key it was sent."""
    SEEN_KEYS.append(headers.get("Authorization", ""))
    return "Score: 2" if body["messages"][-1]["content"].rstrip().endswith("mixed") else "Score: 9"


SEEN_KEYS: list[str] = []


@pytest.fixture
def judge_url():
    with openai_chat_stub(grade_mixed_low) as url:
        yield url


@pytest.mark.integration  # a judge server on 127.0.0.1
def test_judge_scorer_drops_rows_the_endpoint_grades_low(
    tmp_path, tokenizer, judge_url, monkeypatch
):
    monkeypatch.setenv("JUDGE_KEY", "sk-canary-judge-123")
    path = tmp_path / "rows.jsonl"
    rows = make_rows(60, seed=4)
    write_jsonl(path, rows)
    mixed = sum(r["messages"][-1]["content"] == "mixed" for r in rows)
    judge = {"base_url": judge_url, "model": "grader", "api_key_env": "JUDGE_KEY"}
    data = lenient_data([{"path": str(path)}], quality={"scorer": "judge", "judge": judge})
    m = prepare_quietly(data, tmp_path / "o", tokenizer)
    assert m.counts["low_quality"] == mixed > 0
    assert SEEN_KEYS[-1] == "Bearer sk-canary-judge-123"
    dropped = (tmp_path / "o/dropped.jsonl").read_text()
    assert "judge grade 2/10" in dropped
    for f in (tmp_path / "o").iterdir():
        assert b"sk-canary-judge-123" not in f.read_bytes(), f


def test_drop_bottom_fraction_drops_the_lowest_scores(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    rows = make_rows(50, seed=6)
    rows[3]["messages"][-1]["content"] = "bad bad bad bad bad bad bad bad bad bad bad bad"
    write_jsonl(path, rows)
    data = lenient_data(
        [{"path": str(path)}], quality={"min_score": None, "drop_bottom_fraction": 0.1}
    )
    m = prepare_quietly(data, tmp_path / "o", tokenizer)
    assert m.counts["low_quality"] == 5
    dropped = [json.loads(x) for x in (tmp_path / "o/dropped.jsonl").read_text().splitlines()]
    worst = [d for d in dropped if d["where"].endswith(":4")]
    assert len(worst) == 1 and "repetitive" in worst[0]["reason"]


# ---------------------------------------------------------------- the job, the CLI, Ray workers


def test_the_job_reads_a_prepared_set_like_it_prepares_inline(tmp_path, tokenizer):
    job = load_config(REPO / "configs/quickstart.yaml")
    inline = prepare_data(job.data, tokenizer, seed=job.run.seed)
    out = tmp_path / "prepared"
    prepare_quietly(job.data, out, tokenizer, seed=job.run.seed)
    from_disk = prepare_data(DataConfig(prepared=str(out)), tokenizer, seed=0)
    assert from_disk.dataset_hash == inline.dataset_hash
    assert (from_disk.train, from_disk.eval) == (inline.train, inline.eval)
    assert from_disk.report["prepared"] == str(out)
    job = load_config(REPO / "configs/quickstart.yaml", [f"data.prepared={out}"])
    assert (job.data.prepared, job.data.train_files) == (str(out), [])  # the set replaces the files
    with pytest.raises(ConfigError, match="has no manifest.json"):
        prepare_data(DataConfig(prepared=str(tmp_path)), tokenizer, seed=0)


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_prints_the_counts_table_and_writes_the_manifest(tmp_path, tiny_model_dir):
    out = tmp_path / "cli"
    result = subprocess.run(
        [*PREPARE_MESSY, f"tokenizer={tiny_model_dir}", f"output={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "near_duplicates" in result.stdout and "leakage_prevented" in result.stdout
    assert json.loads((out / "manifest.json").read_text())["counts"]["train"] == 38
    bad = subprocess.run(
        [*PREPARE_MESSY, "data.dedup.treshold=0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "treshold" in bad.stderr


@pytest.mark.integration
def test_ray_workers_give_the_same_prepared_set(tmp_path, tokenizer, tiny_model_dir, messy):

    manifest, _ = messy
    cfg = messy_config(tmp_path).model_copy(
        update={"workers": 2, "chunk_rows": 7, "tokenizer": str(tiny_model_dir)}
    )
    from tests.helpers import local_ray

    local_ray()
    on_ray = prepare(cfg, show_progress=False)
    assert on_ray.dataset_hash == manifest.dataset_hash
    assert on_ray.counts == manifest.counts


def test_shipped_prepare_configs_load():
    for path in (REPO / "configs").glob("prepare*.yaml"):
        load_prepare_config(path)
    raw = yaml.safe_load((MESSY / "prepare.yaml").read_text())
    assert raw["data"]["length"]["min_tokens"] == 24
