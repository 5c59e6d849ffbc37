"""Storage: a local path or s3://bucket/prefix, read and written the same way everywhere.

Every module that touches a run, a sweep, a prepared set, a model or the registry goes through
here; none tests for "://" itself. fsspec underneath (s3fs for S3); Ray Train gets the pyarrow
filesystem it needs from `ray_storage`. The S3 endpoint comes from AWS_ENDPOINT_URL(_S3), so
MinIO, R2 and test servers work like AWS; credentials come from the usual AWS chain, never from
a config file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs

SUPPORTED = ("s3://",)


class EmptyLocation(LookupError):
    """A directory or prefix with no files under it (not an I/O failure)."""


def is_remote(url: str) -> bool:
    """True for any URL with a scheme (s3://, gs://, ...), false for a local path."""
    return "://" in str(url)


def unsupported(url: str) -> bool:
    """A URL of a scheme we do not read or write (gs://, hdfs://, ...); file:// is local."""
    return is_remote(url) and not str(url).startswith((*SUPPORTED, "file://"))


def protocol(url: str) -> str:
    """'s3://' for s3://bucket/key, '' for a local path: what a listed key needs back in front."""
    return url.split("://")[0] + "://" if is_remote(url) else ""


def join(url: str, *parts: str) -> str:
    """url/part/...: a local path or a URL, without doubled slashes."""
    return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts if p)])


def s3_endpoint() -> str | None:
    """The S3 endpoint from AWS_ENDPOINT_URL(_S3), so MinIO, R2 and test servers work like AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`: s3:// goes to s3_endpoint() when one is set."""
    endpoint = s3_endpoint()
    if str(url).startswith("s3://") and endpoint:
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(the fsspec filesystem of url, url's path inside it)."""
    return fsspec.core.url_to_fs(str(url), **storage_options(url))


def open_url(url: str, mode: str = "rb", **kwargs):
    """fsspec.open for a local path or s3:// (with the endpoint)."""
    return fsspec.open(str(url), mode, **storage_options(url), **kwargs)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_text(url: str) -> str:
    with open_url(url, "r") as f:
        return f.read()


def write_text(url: str, text: str) -> None:
    """Writes a small file (fsspec makes missing local parent directories)."""
    with open_url(url, "w") as f:
        f.write(text)


def list_files(url: str) -> list[str]:
    """Every file under url, as paths relative to it, sorted."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    return sorted(p[len(root) + 1 :] for p in fs.find(root) if p != root)


def put_dir(local: str | Path, url: str) -> None:
    """Copy a local directory's files under url (a local directory or s3://)."""
    local = Path(local)
    if not is_remote(url):
        if Path(url).resolve() != local.resolve():
            shutil.copytree(local, url, dirs_exist_ok=True)
        return
    fs, root = filesystem(url)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{root.rstrip('/')}/{f.relative_to(local).as_posix()}")


def get_dir(url: str, local: str | Path, parts: tuple[str, ...] | None = None) -> Path:
    """Copy url's files into a local directory; only its top-level entries named in `parts`
    (all when None), so that a run directory is read without its checkpoints."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    local = Path(local)
    for remote in fs.find(root):
        rel = remote[len(root) + 1 :]
        if rel and (parts is None or rel.split("/")[0] in parts):
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(dest))
    return local


def get_file(url: str, local: str | Path) -> None:
    fs, path = filesystem(url)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(path, str(local))


@contextmanager
def local_copy(url: str, parts: tuple[str, ...] | None = None) -> Iterator[Path]:
    """A local directory with url's contents: url itself when local, else a temporary download
    (removed afterwards) of its top-level entries named in `parts` (all when None)."""
    if not is_remote(url):
        yield Path(url)
        return
    with tempfile.TemporaryDirectory(prefix="rayft-copy-") as tmp:
        yield get_dir(url, tmp, parts)


def cached_copy(url: str, cache_dir: str | Path) -> Path:
    """A local copy of a remote directory under cache_dir, downloaded once: a marker file written
    last makes a copy complete, so an interrupted download is redone. Raises EmptyLocation when
    there is nothing under url, OSError when it cannot be listed (s3fs maps auth and network
    errors, and a missing bucket, to OSError)."""
    key = url.split("://", 1)[1].rstrip("/")
    local = Path(cache_dir) / key
    marker = local / ".download-complete"
    if marker.is_file():
        return local
    if not list_files(url):
        raise EmptyLocation(f"no files under {url}")
    get_dir(url, local)
    marker.write_text(url)
    return local


def ray_storage(url: str):
    """Ray Train's (storage_path, storage_filesystem) for a local directory or s3://bucket/prefix."""
    if not str(url).startswith("s3://"):
        return str(url), None
    return url.removeprefix("s3://"), pyarrow.fs.PyFileSystem(PatientS3(s3_endpoint()))


class PatientS3(pyarrow.fs.FileSystemHandler):
    """pyarrow's S3 filesystem with retries that ride out a storage blip of ~25 s (measured:
    10 SDK attempts), made again in every process that unpickles it. Ray Train sends its storage
    filesystem to its controller, which writes the run snapshot with a single call; a plain
    S3FileSystem loses its retry strategy when pickled (3 quick attempts there), so an outage at
    that moment failed the run. Checkpoint uploads have their own, longer retries on top."""

    ATTEMPTS = 10

    def __init__(self, endpoint: str | None):
        self.endpoint, self._fs = endpoint, None

    def __getstate__(self):
        return {"endpoint": self.endpoint}

    def __setstate__(self, state):
        self.endpoint, self._fs = state["endpoint"], None

    @property
    def fs(self):
        if self._fs is None:
            pafs = pyarrow.fs
            kwargs = {"retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=self.ATTEMPTS)}
            if self.endpoint:
                kwargs |= {
                    "endpoint_override": self.endpoint,
                    "scheme": self.endpoint.split("://")[0],
                }
            self._fs = pafs.S3FileSystem(**kwargs)
        return self._fs

    def __eq__(self, other):
        return isinstance(other, PatientS3) and other.endpoint == self.endpoint

    def get_type_name(self):
        return "s3"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)
