"""Helpers for tests that start servers on 127.0.0.1 (Ray heads, S3) and run the venv's commands."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ray, moto_server, python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_lora(cfg, data, tokenizer, steps: int, batch_size: int, lr: float = 2e-3):
    """A LoRA model (cfg.model + cfg.lora) trained in this process for `steps` seeded steps of
    `batch_size` rows of data.train: a real adapter for tests that need one, without Ray."""
    import torch

    from inference.model import load_base_model
    from jobs.batching import collate
    from jobs.model import add_lora

    torch.manual_seed(0)
    model = add_lora(load_base_model(cfg.model, torch.device("cpu")), cfg.lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(data.train), (batch_size,), generator=g).tolist()
        model(**collate([data.train[i] for i in idx], tokenizer.pad_token_id)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def local_ray() -> None:
    """The session's local Ray (2 CPUs), started here unless it runs: every test that needs a plain
    local Ray shares it (tests/conftest.py's `ray_local`). A test that needs a cluster of its own
    calls `ray.shutdown()` first; the next user starts the shared one again."""
    import ray

    from core.ray_cluster import start_local_ray

    global _ray_s3_endpoint
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if ray.is_initialized() and endpoint and endpoint != _ray_s3_endpoint:
        ray.shutdown()  # its workers would not see this module's S3 server (tests/conftest.py)
    if ray.is_initialized() and not ray_is_idle():
        ray.shutdown()  # an earlier module left actors or placement groups holding CPUs
    if not ray.is_initialized():
        start_local_ray(num_cpus=2)
        _ray_s3_endpoint = endpoint


_ray_s3_endpoint: str | None = None  # the S3 endpoint the shared Ray's workers inherited


def ray_is_idle(timeout: float = 10) -> bool:
    """Whether every CPU of this Ray is free again within `timeout` s (a finished module's actors
    and placement groups are released asynchronously)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return True
        time.sleep(0.5)
    return False


def start_local_serve() -> int:
    """Serve's HTTP proxy on 127.0.0.1, on the session's Ray; the proxy's port. The caller ends it
    with serve.shutdown() and leaves Ray running for the next module."""
    from ray import serve

    local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    every: float = 0.5,
    alive: Callable[[], bool] | None = None,
) -> Any:
    """Poll `condition` until it returns something truthy, and return that. Fails after `timeout`
    seconds, or as soon as `alive()` says the thing being waited on has ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert alive is None or alive(), f"it ended before {what}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(
                    f"nothing listens on 127.0.0.1:{port} after {timeout}s"
                ) from None
            time.sleep(0.2)


def stop_ray_head(proc: subprocess.Popen, session_dir: str) -> None:
    """Stop a `ray start --head --block` started with start_new_session=True, and every process of
    its cluster: workers and nodes the autoscaler started run in sessions of their own, but their
    command lines name the cluster's session directory. Never `ray stop`: it stops every Ray
    process on the machine, other tests' clusters included."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", session_dir], check=False)
    shutil.rmtree(session_dir, ignore_errors=True)


def start_ray_head(*args: str, port: int, dashboard_port: int, env: dict[str, str]):
    """`ray start --head --block` in a process group of its own, with a short session directory of
    its own; returns (process, session_dir, the environment it runs with)."""
    session_dir = tempfile.mkdtemp(prefix="rft", dir="/tmp")  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # submitted jobs resolve `python` here
        "RAY_worker_niceness": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # else SIGTERM waits 30 s on a stopping GCS
        **env,
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--temp-dir={session_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, session_dir, env


def upload_dir(endpoint: str, local: Path, bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    for f in local.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local)}")


def chat_completion(content: str, model: str = "stub") -> dict:
    """An OpenAI chat.completion body whose one choice says `content`."""
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@contextlib.contextmanager
def openai_chat_stub(reply: Callable[..., str | tuple[int, dict]]):
    """A local OpenAI-compatible `/v1/chat/completions` (under any path prefix); yields its base
    URL (`http://127.0.0.1:PORT/v1`). Its answer is reply(body, headers, path): a string is the
    reply's content, a (status, payload) pair is sent as it is. For judges and graders under test."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = reply(body, self.headers, self.path)  # headers: case-insensitive .get
            if isinstance(answer, str):
                answer = (200, chat_completion(answer, body["model"]))
            status, payload = answer
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


class TcpProxy:
    """A TCP relay on 127.0.0.1 to a server, with a switch: `down()` makes the server look
    unreachable (new connections are reset, open ones cut) while the server keeps its data, as
    in a storage outage; `up()` restores it. `refused` counts the connections cut while down."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_up, self.refused = True, 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        with self._lock:
            self.is_up = False
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def up(self) -> None:
        with self._lock:
            self.is_up = True

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            with self._lock:
                if not self.is_up:
                    self.refused += 1
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    client.close()  # a reset, as from a host that is gone
                    continue
                server = socket.create_connection(self.target)
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._open -= {src, dst}
