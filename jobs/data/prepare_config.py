"""PrepareConfig: what one run of the data pipeline (jobs/data/prepare.py) reads, and where it writes."""

from __future__ import annotations

from pydantic import Field, model_validator

from core.config import Section
from core.upstream import require
from jobs.config import DataConfig


class PrepareConfig(Section):
    data: DataConfig
    tokenizer: str = Field(min_length=1)  # the job's model: hub id, directory or s3://
    output: str = Field(min_length=1)  # a directory (local or s3://)
    seed: int = 0  # of the hash split; a job preparing inline uses its run.seed
    workers: int = Field(0, ge=0)  # Ray tasks working chunks in parallel; 0: in this process
    chunk_rows: int = Field(2000, ge=1)

    @model_validator(mode="after")
    def _supported_datasketch(self) -> PrepareConfig:
        # near-duplicate removal calls datasketch's private banding (core/upstream/datasketch.py)
        if self.data.dedup.near:
            require("datasketch", why="data.dedup.near: true")
        return self
