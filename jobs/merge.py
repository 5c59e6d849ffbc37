"""Merge a LoRA adapter into its base: a standalone Hugging Face model for tools that do not load
adapters (llama.cpp converters, plain `from_pretrained`, single-model servers).

    python -m jobs.merge runs/quickstart-…/adapter --out merged/quickstart [--dtype bfloat16]
    python -m jobs.merge ADAPTER --out DIR --base PATH_OR_HUB_ID      # when the base has moved

The base comes from the adapter's `base_model_name_or_path` unless --base is given; the merged
model is written with its tokenizer (and chat template) from the adapter directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import torch
import typer

from core.config import ConfigError
from inference.config import ModelConfig
from inference.model import load_base_model, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_adapter(
    adapter: Path, out: Path, base: str | None = None, dtype: str | None = None
) -> Path:
    """Load base + adapter in float32, merge_and_unload, cast, save; returns `out`."""
    from peft import PeftModel

    config_path = Path(adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{adapter}: no adapter_config.json (not a peft adapter directory)")
    base = base or json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config_path}: no base_model_name_or_path; give --base")
    # merge in float32 whatever the final dtype: B @ A added to a bf16 weight loses the update
    model_cfg = ModelConfig(name_or_path=base, dtype="float32")
    model = PeftModel.from_pretrained(load_base_model(model_cfg, torch.device("cpu")), str(adapter))
    merged = model.merge_and_unload()
    if dtype:
        merged = merged.to(DTYPES[dtype])
    out = Path(out)
    merged.save_pretrained(out)
    tokenizer_dir = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else None
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tokenizer_dir or base)))
    tokenizer.save_pretrained(out)
    return out


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    adapter: Annotated[Path, typer.Argument(help="a peft adapter directory")],
    out: Annotated[Path, typer.Option(help="where the merged model goes")],
    base: Annotated[str | None, typer.Option(help="base model (default: the adapter's)")] = None,
    dtype: Annotated[
        Literal["float32", "bfloat16", "float16"] | None, typer.Option(help="cast after merging")
    ] = None,
) -> None:
    """Merge ADAPTER into its base model and save a standalone model to --out."""
    try:
        path = merge_adapter(adapter, out, base, dtype)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"merged model: {path}")


if __name__ == "__main__":
    app()
