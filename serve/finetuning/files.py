"""File bytes in storage: a local directory or s3://bucket/prefix (core.storage underneath).
The database holds each file's record; storage holds its bytes under TENANT/FILE_ID."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core import storage

CHUNK = 1 << 20


class TooLarge(Exception):
    pass


class FileStore:
    def __init__(self, root: str):
        self.root = root if storage.is_remote(root) else str(Path(root).expanduser().resolve())

    def uri(self, tenant: str, file_id: str, ext: str = ".jsonl") -> str:
        # with its extension: the data pipeline knows a file's format by it
        return storage.join(self.root, tenant, file_id + ext)

    def put(self, tenant: str, file_id: str, src: BinaryIO, max_bytes: int) -> tuple[int, str]:
        """Copy `src` in, stopping (and removing the partial copy) past `max_bytes`; returns
        (size, sha256)."""
        uri = self.uri(tenant, file_id)
        fs, path = storage.filesystem(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        h, size = hashlib.sha256(), 0
        try:
            with fs.open(path, "wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge
                    h.update(chunk)
                    out.write(chunk)
        except BaseException:
            self.delete(uri)
            raise
        return size, h.hexdigest()

    def put_bytes(self, tenant: str, file_id: str, data: bytes, ext: str) -> str:
        uri = self.uri(tenant, file_id, ext)
        fs, path = storage.filesystem(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
        return uri

    def read(self, uri: str) -> Iterator[bytes]:
        with storage.open_url(uri, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete(self, uri: str) -> None:
        fs, path = storage.filesystem(uri)
        if fs.exists(path):
            fs.rm(path)
