"""Helpers to run the real `tokenworks serve` in a test: a subprocess on 127.0.0.1, stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str, startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = f"/tmp/tokenworks-test-serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "tokenworks.cli", "serve", "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not healthy after {startup_timeout}s:\n{self.output()}")
            time.sleep(0.25)

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def workers(self) -> dict:
        return httpx.get(self.url + "/debug/workers", timeout=5).json()["workers"]

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Every worker back to its idle KV state (no blocks used, nothing held or running)."""
        deadline = time.monotonic() + timeout
        while True:
            w = self.workers()
            if all(v.get("idle") for v in w.values()):
                return w
            if time.monotonic() > deadline:
                raise AssertionError(f"workers not idle: {w}")
            time.sleep(0.1)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + (labels and "{")) and (not labels or labels in line):
                total += float(line.rsplit(" ", 1)[1])
            elif not labels and line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if os.path.exists(self.log_path):
            os.unlink(self.log_path)
