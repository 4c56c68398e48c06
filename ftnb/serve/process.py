"""`python -m ftnb serve` as a subprocess, for notebooks and tests: start it on a free local port,
wait until it answers, stop it.

Usage: with start_server(["runs/x/adapter"]) as server: OpenAI(base_url=server.url, api_key="none")
"""
from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


class ServerProcess:
    """A running `python -m ftnb serve`: `url` for an OpenAI client, `stop()` (or a with block) ends it."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, log_path: Path):
        self.process, self.log_path = process, log_path
        self.root, self.url = f"http://{host}:{port}", f"http://{host}:{port}/v1"
        atexit.register(self.stop)  # a forgotten server must not outlive the notebook's kernel

    def wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} before answering; "
                                   f"the end of its log ({self.log_path}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.root}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server did not answer within {timeout_s:.0f} s; "
                           f"the end of its log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30) -> int:
        """Terminate the server, wait for it (kill it after `timeout_s`) and return its exit code."""
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(specs: list[str], port: int = 0, host: str = "127.0.0.1", timeout_s: float = 600,
                 **options) -> ServerProcess:
    """Start `python -m ftnb serve` in a subprocess and return once /health answers. port=0 picks a
    free port; `options` are the command's (max_batch_size=16, max_new_tokens_limit=512, batch_wait_ms=20).
    Its output goes to a log file (`server.log_path`), quoted in the error if it fails to start.

    Usage: with start_server(["runs/x/adapter"]) as server: OpenAI(base_url=server.url, api_key="none")
    """
    port = port or _free_port(host)
    command = [sys.executable, "-m", "ftnb", "serve", *map(str, specs), "--host", host, "--port", str(port)]
    for option, value in options.items():
        command += [f"--{option.replace('_', '-')}", str(value)]
    log_path = Path(tempfile.mkstemp(prefix="ftnb-serve-", suffix=".log")[1])
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = ServerProcess(process, host, port, log_path)
    server.wait_until_ready(timeout_s)
    return server


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
