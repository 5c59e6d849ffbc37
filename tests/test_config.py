"""Job configs: shipped YAMLs load, overrides parse, bad configs fail at load naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, apply_overrides, parse_overrides
from jobs.config import load_config

REPO = Path(__file__).resolve().parents[1]
# Job configs; serve*, prepare*, sweep* and pipeline* files are loaded by their own tests.
OTHER_CONFIGS = ("serve", "prepare", "sweep", "pipeline", "eval")
CONFIGS = sorted(
    p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith(OTHER_CONFIGS)
)


def write(tmp_path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(**sections) -> dict:
    base = {
        "run": {"name": "t"},
        "model": {"name_or_path": "org/model"},
        "data": {"train_files": ["a.jsonl"]},
    }
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return base


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_command(path):
    assert path.read_text().splitlines()[0].startswith(("# python -m", "# ray ", "# serve ")), path
    cfg = load_config(path)
    assert cfg.run.name


def test_shipped_configs_exist():
    assert REPO / "configs" / "quickstart.yaml" in CONFIGS


def test_override_values_are_parsed_as_yaml():
    assert parse_overrides(
        [
            "train.lr=1e-4",
            "lora.r=8",
            "scaling.use_gpu=true",
            "lora.target_modules=[q_proj,v_proj]",
            "train.max_steps=null",
            "run.name=abc",
            "data.system_prompt=",
        ]
    ) == {
        "train.lr": 1e-4,
        "lora.r": 8,
        "scaling.use_gpu": True,
        "lora.target_modules": ["q_proj", "v_proj"],
        "train.max_steps": None,
        "run.name": "abc",
        "data.system_prompt": "",
    }


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1e-4", 1e-4),  # YAML 1.1 alone reads these three as strings
        ("1E4", 1e4),
        ("-3e-5", -3e-5),
        ("1.0e4", 1e4),
        ("2.0e-3", 2e-3),
        (".5", 0.5),
        ("8", 8),
        ("-1", -1),
        ("false", False),
        ("~", None),
        ("[1, 2.5, x]", [1, 2.5, "x"]),
        ("{spot: 1}", {"spot": 1}),
        ("1e-4x", "1e-4x"),
        ("a=b", "a=b"),  # only the first '=' separates
        ("'1e-4'", "1e-4"),  # quoted: a string, as YAML says
        ('"1234e56"', "1234e56"),
        ("'true'", "true"),
    ],
)
def test_override_value_types(raw, value):
    parsed = parse_overrides([f"k={raw}"])["k"]
    assert parsed == value and type(parsed) is type(value)


def test_quoted_override_reaches_a_string_field(tmp_path):
    # a revision that looks like a number in e-notation can still be given on the command line
    cfg = load_config(write(tmp_path, minimal()), ["model.revision='1234e56'"])
    assert cfg.model.revision == "1234e56"
    with pytest.raises(ConfigError, match=r"model\.revision: .*valid string"):
        load_config(write(tmp_path, minimal()), ["model.revision=1234e56"])


def test_override_creates_new_nested_sections_at_load(tmp_path):
    path = write(tmp_path, minimal())
    assert "eval" not in path.read_text() and "scaling" not in path.read_text()
    cfg = load_config(
        path,
        [
            "eval.every_steps=5",
            "eval.early_stopping_patience=2",
            "scaling.resources_per_worker.spot=1",
            "scaling.num_workers=2",
            "train.micro_batch_size=2",
        ],
    )
    assert (cfg.eval.every_steps, cfg.eval.early_stopping_patience) == (5, 2)
    assert cfg.scaling.resources_per_worker == {"spot": 1.0}
    assert cfg.grad_accum_steps == 16 // (2 * 2)


def test_overrides_win_over_the_file(tmp_path):
    cfg = load_config(write(tmp_path, minimal(train={"lr": 0.5, "epochs": 3})), ["train.lr=0.25"])
    assert (cfg.train.lr, cfg.train.epochs) == (0.25, 3)


def test_overrides_reach_the_typed_config(tmp_path):
    cfg = load_config(
        write(tmp_path, minimal()),
        ["train.lr=1e-4", "lora.r=8", "train.micro_batch_size=2", "train.effective_batch_size=8"],
    )
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 8
    assert cfg.grad_accum_steps == 4


def test_override_creates_missing_sections_but_not_inside_values():
    assert apply_overrides({"a": None}, {"a.b.c": 1}) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="train.lr is a value"):
        apply_overrides({"train": {"lr": 1.0}}, {"train.lr.x": 2})


@pytest.mark.parametrize("bad", ["foo", "train.lr", "=3", " train.lr=3", "train.lr =3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides([bad])


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, minimal())
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.lrr=1"])
    assert str(path) in str(e.value)
    assert "unknown key 'train.lrr'" in str(e.value)
    assert "did you mean 'train.lr'" in str(e.value)


@pytest.mark.parametrize(
    ("override", "unknown", "suggestion"),
    [
        ("scaling.num_worker=2", "scaling.num_worker", "scaling.num_workers"),
        ("eval.every_step=5", "eval.every_step", "eval.every_steps"),
        ("data.eval_file=x.jsonl", "data.eval_file", "data.eval_files"),
        ("lora.rank=8", "lora.rank", "lora.r"),
        ("qqqq.zzz=8", "qqqq", None),  # nothing close enough to suggest
    ],
)
def test_unknown_nested_keys(tmp_path, override, unknown, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, minimal()), [override])
    assert f"unknown key '{unknown}'" in str(e.value)
    if suggestion:
        assert f"(did you mean '{suggestion}'?)" in str(e.value)
    else:
        assert "did you mean" not in str(e.value)


def test_every_error_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, minimal()), ["train.lr=abc", "lora.r=0", "train.epochs=x"])
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'job.yaml'}: ")
    for field in ("train.lr: ", "lora.r: ", "train.epochs: "):
        assert field in message, field


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, {**minimal(), "trian": {"lr": 1}}))


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.r: .*integer"):
        load_config(write(tmp_path, minimal(lora={"r": "big"})))


def test_missing_required_field(tmp_path):
    data = minimal()
    del data["model"]
    with pytest.raises(ConfigError, match="model: required field is missing"):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.micro_batch_size=3", "train.effective_batch_size=16"],
            "multiple of train.micro_batch_size",
        ),
        (
            ["scaling.num_workers=3", "train.micro_batch_size=4", "train.effective_batch_size=16"],
            "x 3 = 12",
        ),
        (["data.eval_fraction=0"], "no held-out set"),
        (["eval.early_stopping_patience=2"], "needs eval.every_steps"),
        (["train.precision=fp16"], "fp16 needs scaling.use_gpu"),
        (
            ["model.attn_implementation=flash_attention_2"],
            "flash_attention_2 needs scaling.use_gpu",
        ),
        (["model.quantization.bits=4"], "QLoRA's 4-bit kernels .* need CUDA"),
        (["model.quantization.bits=4", "lora=null"], "QLoRA.* give a lora section"),
        (["model.liger_kernel=true"], "liger_kernel.*use_gpu"),
        (
            [
                "train.strategy=deepspeed",
                "train.deepspeed.stage=2",
                "train.deepspeed.offload_params=true",
            ],
            "offload_params needs train.deepspeed.stage: 3",
        ),
        (["train.strategy=megatron"], r"train\.strategy"),
        (["train.method=dpo", "lora=null"], r"train\.method: dpo trains a LoRA adapter"),
        (["train.method=dpo", "train.packing=true"], r"train\.packing: not supported"),
        (
            ["train.dpo.label_smoothing=0.1"],
            r"train\.dpo: label_smoothing is used by loss_type: robust",
        ),
        (["train.lr=-1"], r"train\.lr: .*greater than 0"),
        (["tracking.backend=neptune"], r"tracking\.backend"),
        (["run.name=has space"], r"run\.name"),
    ],
)
def test_contradictions_fail_at_load(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, minimal()), overrides)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listing)


def test_single_file_string_becomes_a_list(tmp_path):
    data = minimal()
    data["data"]["train_files"] = "only.jsonl"
    assert load_config(write(tmp_path, data)).data.train_files == ["only.jsonl"]


@pytest.mark.parametrize(
    "override",
    [
        "scaling.num_workers=2 train.micro_batch_size=8",
        "train.strategy=fsdp",
        "scaling.max_failures=1",
    ],
)
def test_a_job_in_this_process_has_one_ddp_worker_and_no_restarts(override):
    with pytest.raises(ConfigError, match=r"scaling\.local: a job in this process has"):
        load_config(REPO / "configs/quickstart.yaml", ["scaling.local=true", *override.split()])
    load_config(REPO / "configs/quickstart.yaml", ["scaling.local=true"])


def test_a_job_in_this_process_takes_no_ray_train_callback():
    """Ray Train's local mode runs no controller to call them: a sweep trial in its own process
    reports through on_report (tests/test_sweep.py), and on_report is refused on workers."""
    from jobs.finetune import fit

    cfg = load_config(REPO / "configs/quickstart.yaml", ["scaling.local=true"])
    with pytest.raises(ConfigError, match="a job in this process calls no Ray Train callback"):
        fit(cfg, None, callbacks=[object()])
    workers = load_config(REPO / "configs/quickstart.yaml")
    with pytest.raises(ValueError, match="on_report is for a job in this process"):
        fit(workers, None, callbacks=[], on_report=print)
