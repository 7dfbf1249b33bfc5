"""The server handle (tools/server.py) and setup's judge record (tools/judge.py), against a stand-in server that answers
``/v1/models`` and then crashes on its first chat completion, as the natively built llama.cpp server did on a
machine with AVX-512 and AMX, and one that answers."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tools import judge
from tools import server as srv

STAND_IN = textwrap.dedent(
    """
    import json, os, signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    CRASH = sys.argv[2] == "crash"

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"data": [{"id": "stand-in"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if CRASH:
                print("about to compute the first token", flush=True)
                os.kill(os.getpid(), signal.SIGSEGV)
            self._send({"choices": [{"message": {"role": "assistant", "content": "Hi"}}]})

    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def _stand_in(tmp_path: Path, mode: str) -> judge.Server:
    script = tmp_path / "server.py"
    script.write_text(STAND_IN)
    port = srv.free_port()
    return srv.Server([sys.executable, str(script), str(port), mode], port, tmp_path / "server.log")


def test_a_server_that_answers_gives_its_token(tmp_path):
    with _stand_in(tmp_path, "answer") as server:
        assert server.one_token("stand-in") == "Hi"
        with server.watch():
            pass
    assert server.died()


def test_a_crash_on_the_first_completion_is_named_with_its_signal_and_log(tmp_path):
    with _stand_in(tmp_path, "crash") as server:
        with pytest.raises(srv.ServerDied) as err:
            server.one_token("stand-in")
    message = str(err.value)
    assert "SIGSEGV" in message and "about to compute the first token" in message


def test_watch_reports_a_server_that_died_under_the_block_instead_of_the_clients_error(tmp_path):
    """The test's own failure (here, the client's connection error) is chained; the message is the crash."""
    with _stand_in(tmp_path, "crash") as server:
        with pytest.raises(srv.ServerDied, match="SIGSEGV") as err:
            with server.watch():
                try:
                    server.one_token("stand-in")
                except srv.ServerDied:
                    raise ConnectionRefusedError("Connection refused") from None
        assert isinstance(err.value.__cause__, ConnectionRefusedError)


def test_watch_adds_the_log_to_other_failures_of_a_live_server(tmp_path):
    with _stand_in(tmp_path, "answer") as server:
        with pytest.raises(AssertionError) as err:
            with server.watch():
                raise AssertionError("a result was wrong")
    assert any("server log tail" in note for note in err.value.__notes__)


def test_a_server_that_ends_before_answering_is_named(tmp_path):
    port = srv.free_port()
    cmd = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with pytest.raises(srv.ServerDied, match="exited with status 3(.|\n)*no model here"):
        srv.Server(cmd, port, tmp_path / "server.log").start(timeout=30)


def test_exit_statuses_in_words():
    assert srv.exit_status(-signal.SIGSEGV) == "killed by signal SIGSEGV (11)"
    assert srv.exit_status(-signal.SIGILL) == "killed by signal SIGILL (4)"
    assert srv.exit_status(2) == "exited with status 2"


def test_the_skip_reason_names_every_build_and_its_crash():
    status = {
        "ok": False,
        "cpu": "avx2 avx512f amx_int8",
        "attempts": [
            {"build": "portable", "error": "ServerDied: ... killed by signal SIGSEGV (11) ..."},
            {"build": "baseline", "error": "ServerDied: ... killed by signal SIGILL (4) ..."},
        ],
    }
    reason = judge.skip_reason(status)
    assert "portable build" in reason and "SIGSEGV" in reason and "baseline build" in reason and "SIGILL" in reason


def test_builds_name_their_instruction_sets_and_never_the_build_machines_own():
    """No build may use ``-march=native`` (what crashed) or AVX-512 / AMX; their cache keys differ."""
    for build in judge.BUILDS:
        args = set(build.cmake_args)
        assert "-DGGML_NATIVE=OFF" in args and "-DGGML_NATIVE=ON" not in args
        assert {"-DGGML_AVX512=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_TILE=OFF"} <= args
    assert len({b.key("0.3.36") for b in judge.BUILDS}) == len(judge.BUILDS)
    assert "-DGGML_AVX2=OFF" in judge.BUILDS[-1].cmake_args  # the last resort runs on any x86-64


def test_the_recorded_status_is_read_back(tmp_path):
    path = tmp_path / "judge-check.json"
    assert judge.read_status(path) is None
    path.write_text(json.dumps({"ok": True, "build": "portable"}))
    assert judge.read_status(path) == {"ok": True, "build": "portable"}


# ------------------------------------------------------------------ ensure: builds tried in order, outcome recorded
@pytest.fixture
def fake_builds(tmp_path, monkeypatch):
    """``ensure`` with compiling, installing and the server check replaced: ``answers[build]`` is what the check
    of that build returns (None: it answered)."""
    calls: list[str] = []
    answers: dict[str, str | None] = {}
    monkeypatch.setattr(judge, "STATUS_FILE", tmp_path / "judge-check.json")
    monkeypatch.setattr(judge, "_pip", lambda *a, **k: type("Done", (), {"returncode": 0, "stderr": ""})())
    monkeypatch.setattr(judge, "_installed_version", lambda: "0.3.36")

    def build_wheel(build, version, cache):
        calls.append(f"build {build.name}")
        return tmp_path / f"{build.name}.whl"

    def check_installed(log):
        name = calls[-1].split()[-1] if calls else "installed"
        calls.append(f"check {name}")
        return answers[name]

    monkeypatch.setattr(judge, "build_wheel", build_wheel)
    monkeypatch.setattr(judge, "check_installed", check_installed)
    return calls, answers


def test_a_build_that_crashes_is_followed_by_the_baseline_build(fake_builds, tmp_path):
    calls, answers = fake_builds
    answers.update(portable="ServerDied: ... killed by signal SIGSEGV (11) ...", baseline=None)
    assert judge.ensure("0.3.36", tmp_path / "cache", tmp_path / "logs")
    assert calls == ["build portable", "check portable", "build baseline", "check baseline"]
    status = judge.read_status()
    assert status["ok"] and status["build"] == "baseline"
    assert [a["build"] for a in status["attempts"]] == ["portable"] and "SIGSEGV" in status["attempts"][0]["error"]


def test_when_no_build_answers_the_record_names_each_crash(fake_builds, tmp_path):
    calls, answers = fake_builds
    answers.update(
        portable="ServerDied: killed by signal SIGSEGV (11)", baseline="ServerDied: killed by signal SIGILL (4)"
    )
    assert not judge.ensure("0.3.36", tmp_path / "cache", tmp_path / "logs")
    status = judge.read_status()
    assert status["ok"] is False
    reason = judge.skip_reason(status)
    assert "SIGSEGV" in reason and "SIGILL" in reason


def test_an_installed_build_that_still_answers_is_kept(fake_builds, tmp_path):
    calls, answers = fake_builds
    answers.update(portable=None, baseline=None)
    assert judge.ensure("0.3.36", tmp_path / "cache", tmp_path / "logs")
    calls.clear()
    answers["installed"] = None
    assert judge.ensure("0.3.36", tmp_path / "cache", tmp_path / "logs")
    assert calls == ["check installed"]  # nothing compiled again
    calls.clear()
    assert judge.ensure("0.3.37", tmp_path / "cache", tmp_path / "logs")  # another version: built anew
    assert calls[0] == "build portable"


@pytest.mark.slow
def test_the_installed_judge_holds_no_avx512_or_amx_instructions():
    """Whatever CPU compiled it, the installed judge's libraries hold no AVX-512 (zmm registers) or AMX (tile)
    instruction, what the crashing native build had; the baseline build holds no AVX (ymm) either. Read from the
    machine code itself, so it holds on a CPU without these instructions, where a crash could never be seen."""
    import importlib.util
    import re
    import shutil
    import subprocess

    status = judge.read_status()
    spec = importlib.util.find_spec("llama_cpp")
    if status is None or not status.get("ok") or spec is None:
        pytest.skip("no llama.cpp judge was built and checked here (`bash setup.sh --tests`)")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    libs = sorted((Path(spec.origin).parent / "lib").glob("*.so"))
    assert libs, f"no shared libraries next to {spec.origin}"
    forbidden = r"%zmm\d|%tmm\d|\b(ldtilecfg|sttilecfg|tileloadd\w*|tilestored|tilezero|tilerelease|tdp\w+)\b"
    for lib in libs:
        code = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True, check=True
        ).stdout
        assert not re.search(forbidden, code), f"{lib.name} holds AVX-512 or AMX instructions"
        if status["build"] == "baseline":
            assert "%ymm" not in code, f"{lib.name} holds AVX instructions"
