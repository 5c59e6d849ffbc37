"""Can the serving app load this adapter on this base? Checked before promotion, so a broken
adapter never reaches the registry: rank within the server's limit, only target modules the
server supports, no `modules_to_save` or resized embeddings (their weights replace the base's,
which a shared-base multi-adapter server cannot do per request), and a tokenizer and chat
template identical to the base's (an adapter trained with another template answers garbage:
vllm#2847, vllm#9280, Qwen3#112)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import Field

from core.config import Section

# Linear layers of the usual decoder blocks (Llama, Mistral, Qwen, Gemma, Phi-3 style names).
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "qkv_proj", "gate_up_proj", "dense", "fc1", "fc2")  # fmt: skip
EMBEDDING_WEIGHTS = ("embed_tokens.weight", "lm_head.weight", "wte.weight")


class ServingLimits(Section):
    max_lora_rank: int = Field(64, ge=1)
    supported_modules: list[str] = list(SUPPORTED_MODULES)


def _tokenizer_fingerprint(folder: Path) -> dict[str, str | None]:
    """Hashes of what decides token ids and prompts: the vocabulary/merges and the template."""
    out: dict[str, str | None] = {}
    tok = folder / "tokenizer.json"
    if tok.is_file():
        # padding/truncation are call-time settings that saving a used tokenizer records
        spec = {
            k: v
            for k, v in json.loads(tok.read_text()).items()
            if k not in ("padding", "truncation")
        }
        out["tokenizer.json"] = hashlib.sha256(
            json.dumps(spec, sort_keys=True).encode()
        ).hexdigest()
    else:
        out["tokenizer.json"] = None
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    out["chat_template"] = hashlib.sha256(template.encode()).hexdigest() if template else None
    return out


def servability_problems(adapter_dir: Path, base_dir: Path, limits: ServingLimits) -> list[str]:
    """Every reason the server could not serve this adapter correctly; [] when it can."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        return [f"{adapter_dir}: no adapter_config.json (not a peft adapter)"]
    cfg = json.loads(config_path.read_text())
    return [
        *_adapter_config_problems(cfg, limits),
        *_embedding_weight_problems(adapter_dir / "adapter_model.safetensors"),
        *_tokenizer_problems(adapter_dir, base_dir),
        *_architecture_problems(cfg.get("base_model_name_or_path"), base_dir),
    ]


def _adapter_config_problems(cfg: dict, limits: ServingLimits) -> list[str]:
    """What adapter_config.json says that the server cannot do: its type, rank and modules."""
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(
            f"peft_type is {cfg.get('peft_type')}: the server serves LoRA adapters only"
        )
    if cfg.get("use_dora"):
        problems.append("DoRA adapters (use_dora) are not supported by the server")
    rank = max([cfg.get("r", 0), *(cfg.get("rank_pattern") or {}).values()])
    if rank > limits.max_lora_rank:
        problems.append(
            f"LoRA rank {rank} is above the server's max_lora_rank {limits.max_lora_rank}"
        )
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    # all-linear adapters list full paths (model.layers.0.self_attn.q_proj): the leaf decides
    unsupported = sorted({t.rsplit(".", 1)[-1] for t in targets} - set(limits.supported_modules))
    if unsupported:
        problems.append(
            f"target modules {unsupported} are not supported by the server "
            f"(supported: {', '.join(limits.supported_modules)})"
        )
    if cfg.get("modules_to_save"):
        problems.append(
            f"modules_to_save {cfg['modules_to_save']}: full copies of base modules cannot be "
            "swapped per request on a shared base"
        )
    return problems


def _embedding_weight_problems(weights: Path) -> list[str]:
    if not weights.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())  # noqa: SIM118 - a safetensors file is not a dict
    resized = [k for k in names if any(m in k for m in EMBEDDING_WEIGHTS)]
    if not resized:
        return []
    return [
        f"the adapter carries embedding/output weights ({resized[0]}, ...): "
        "resized or retrained embeddings"
    ]


def _tokenizer_problems(adapter_dir: Path, base_dir: Path) -> list[str]:
    ours, theirs = _tokenizer_fingerprint(adapter_dir), _tokenizer_fingerprint(base_dir)
    return [
        f"the adapter's {part} differs from the base model's "
        "(prompts would be rendered or tokenized differently)"
        for part in ("tokenizer.json", "chat_template")
        if ours[part] and theirs[part] and ours[part] != theirs[part]
    ]


def _architecture_problems(base_name: str | None, base_dir: Path) -> list[str]:
    """The base the adapter was trained on, when it is a local directory, must have the same
    architecture as the base it is served on."""
    base_cfg = base_dir / "config.json"
    if not (base_cfg.is_file() and base_name and Path(base_name).is_dir()):
        return []
    got_path = Path(base_name) / "config.json"
    if not got_path.is_file():
        return []
    want, got = json.loads(base_cfg.read_text()), json.loads(got_path.read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    if all(got.get(k) == want.get(k) for k in keys):
        return []
    return [f"the adapter was trained on {base_name}, whose architecture differs from {base_dir}"]
