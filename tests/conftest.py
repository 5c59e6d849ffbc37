"""Shared fixtures: the tiny model every test loads through from_pretrained, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jobs.tiny_model import main as build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(out, seed=0, hidden=256, layers=2)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)
