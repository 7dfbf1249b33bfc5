"""An OpenAI-compatible server as a child process, as the tests and ``setup.sh --tests`` use one: started and
waited for, asked for one token, and, whenever it is needed and gone, reported with its exit status or signal
and the tail of its log (never only as the client's "connection refused")."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Lines of a server log kept in a failure message.
LOG_TAIL_LINES = 40


class ServerDied(RuntimeError):
    """The server process ended while it was needed; the message holds its exit status and log tail."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_status(returncode: int) -> str:
    """``returncode`` of a child process in words: a signal by name (SIGSEGV), else the exit status."""
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name} ({-returncode})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Server:
    """An OpenAI-compatible server as a child process, logging to ``log``.

    ``start()`` waits until ``GET /v1/models`` answers; every failure names the process's exit status (or that it
    still runs) and the tail of its log. ``watch()`` wraps the code that uses it, so that a server that dies
    under a test is reported as that, not as the client's "connection refused".
    """

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.cmd, self.port, self.log, self.env = cmd, port, Path(log), env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The API root, ``http://127.0.0.1:<port>/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        """The process's state (exit status or signal, or still running) and its log's tail."""
        if self.proc is None:
            state = "not started"
        else:
            rc = self.proc.poll()
            state = "still running" if rc is None else exit_status(rc)
        return f"`{' '.join(self.cmd[:4])} ...` {state}; the last lines of its log ({self.log}):\n{self.log_tail()}"

    def died(self) -> bool:
        """Whether the process was started and has ended."""
        return self.proc is not None and self.proc.poll() is not None

    def start(self, timeout: float = 240.0) -> Server:
        """Start the process and wait until ``/v1/models`` answers (``ServerDied`` / ``TimeoutError`` otherwise)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(self.env or {})}
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.died():
                raise ServerDied(f"the server ended before it answered: {self.describe()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    r.read()
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the server did not answer {self.url}/models within {timeout:.0f} s: {self.describe()}")

    def one_token(self, model: str, timeout: float = 120.0) -> str:
        """Ask for a one-token chat completion; its text (``ServerDied`` naming the crash if the server dies)."""
        body = json.dumps(
            {
                "model": model,
                "max_tokens": 1,
                "temperature": 0.0,
                "messages": [{"role": "user", "content": "Say hello."}],
            }
        ).encode()
        req = urllib.request.Request(
            f"{self.url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out = json.loads(r.read())
        except (OSError, ValueError) as exc:
            time.sleep(1.0)  # a crashing server may still be on its way down
            if self.died():
                raise ServerDied(f"the server died on a one-token completion: {self.describe()}") from exc
            raise RuntimeError(f"a one-token completion failed ({exc}): {self.describe()}") from exc
        try:
            return out["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"a one-token completion returned no message: {str(out)[:500]}") from exc

    @contextmanager
    def watch(self) -> Iterator[Server]:
        """Run the block; if the server died meanwhile, raise ``ServerDied`` naming how (chained to any error);
        any other error gets the server's log tail as a note."""
        try:
            yield self
        except BaseException as exc:
            if self.died():
                raise ServerDied(f"the server died during the test: {self.describe()}") from exc
            exc.add_note(f"server log tail ({self.log}):\n{self.log_tail()}")
            raise
        if self.died():
            raise ServerDied(f"the server died during the test: {self.describe()}")

    def stop(self) -> None:
        """Terminate the process (kill it after 30 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
