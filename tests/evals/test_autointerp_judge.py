"""Autointerp with a local OpenAI-compatible judge: SAEBench's own autointerp end to end against llama.cpp's server
(``llama-cpp-python[server]``, built by ``bash setup.sh --tests``) serving the offline SmolLM2-135M-Instruct GGUF, the
scoring answers constrained by a grammar; the stream-only path against ``transformers serve``; the request options."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pipeline.evals.judge import SCORING_GRAMMAR, SCORING_REGEX, JudgeCalls, JudgeClient, JudgeSettings
from tests.conftest import SAEBENCH_TINY_RUN_WARNINGS, tiny_eval_config
from tools import judge as local_judge
from tools.server import Server, free_port

pytestmark = SAEBENCH_TINY_RUN_WARNINGS
JUDGE_NAME = local_judge.JUDGE_NAME


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's server on the SmolLM2 GGUF, started and asked for one token. Skipped only when it is not installed
    or when ``setup.sh --tests`` recorded that no build answered here (the skip names each build's crash); a server
    that dies here or under a test fails it with its exit status or signal and its log's tail."""
    status = local_judge.read_status()
    if status is not None and not status["ok"]:
        pytest.skip(local_judge.skip_reason(status))
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(
            "llama-cpp-python[server] is not installed: `bash setup.sh --tests` builds it "
            "(python -m tools.judge ensure)"
        )
    server = local_judge.llama_server(tmp_path_factory.mktemp("llama") / "server.log").start()
    try:
        server.one_token(JUDGE_NAME)
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_saebench_autointerp_runs_against_a_local_llama_cpp_judge(llama_server, eval_inputs, tmp_path, monkeypatch):
    from stages import evaluate

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a base_url needs no key
    cfg = tiny_eval_config(eval_inputs, tmp_path, ["autointerp"])
    node = cfg.eval.autointerp
    node.base_url, node.model = llama_server.url, JUDGE_NAME
    node.extra_body = {"temperature": 0.0}
    node.scoring_extra_body = {"grammar": SCORING_GRAMMAR}
    with llama_server.watch():  # a server that dies under the run is reported as that, with its signal and log
        folder = evaluate.run(
            cfg,
            run_dir=tmp_path / "evaluate",
            fit_dir=eval_inputs["fit"],
            baselines_dir=eval_inputs["baselines"],
            store_dir=eval_inputs["store"],
            model=eval_inputs["model"],
        )
        assert json.loads((folder / "failed.json").read_text()) == []
    results = sorted((folder / "eval_results" / "autointerp").glob("*_eval_results.json"))
    assert [p.name for p in results] == [
        "dbksvd_plain_K64_k4_custom_sae_eval_results.json",
        "topk_K64_k4_custom_sae_eval_results.json",
    ]
    for path in results:  # SAEBench's own result file
        out = json.loads(path.read_text())
        score = out["eval_result_metrics"]["autointerp"]["autointerp_score"]
        assert 0.0 <= score <= 1.0
        judged = out["eval_result_unstructured"]
        assert judged and all(isinstance(v["explanation"], str) and 0 <= v["score"] <= 1 for v in judged.values())
    info = json.loads((folder / "eval_info.json").read_text())
    judge = info["sizes"]["autointerp"]["judge"]
    assert judge["base_url"] == llama_server.url and judge["model"] == JUDGE_NAME
    assert judge["requests"] >= 2 * len(results) and judge["failed_requests"] == 0
    note = next(n for n in info["notes"] if n["metric"] == "autointerp")
    assert note["low_confidence"] and JUDGE_NAME in note["note"]
    assert (folder / "eval_results" / "autointerp" / "logs.txt").is_file()


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory):
    from transformers.commands.serving import serve_dependencies_available

    if not serve_dependencies_available:
        pytest.skip("`transformers serve` needs fastapi and uvicorn: `pip install -e .[dev]` installs them")
    from pipeline.data.offline_models import OFFLINE_MODELS, converted_dir

    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    cmd += ["--force_model", str(converted_dir(OFFLINE_MODELS["smollm2-135m"]))]
    server = Server(cmd, port, tmp_path_factory.mktemp("tserve") / "server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_a_stream_only_server_is_asked_for_a_stream_and_joined(transformers_server):
    """``transformers serve`` (4.57) answers chat completions only as a stream; the judge joins it into the one
    completion SAEBench reads, with the configured model name and options sent."""
    calls = JudgeCalls()
    client = JudgeClient(
        api_key="unused",
        settings=JudgeSettings(transformers_server.url, "any-name", stream=True, extra_body={"temperature": 0.0}),
        calls=calls,
    )
    with transformers_server.watch():
        out = client.chat.completions.create(
            model="gpt-4o-mini", n=1, max_tokens=8, stream=False, messages=[{"role": "user", "content": "Say hello."}]
        )
    (choice,) = out.choices
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert calls.requests == 1 and calls.failures == 0


def test_scoring_requests_get_their_options_and_the_model_name_is_replaced(monkeypatch):
    """Without a server: what the judge client hands the openai client (SAEBench's own prompt builders)."""
    import sae_bench.evals.autointerp.main as ai

    from pipeline.evals.judge import use_judge

    sent = []

    class Completions:
        def create(self, **kw):
            sent.append(kw)
            return None

    settings = JudgeSettings(
        "http://127.0.0.1:9/v1",
        "local-judge",
        extra_body={"temperature": 0},
        scoring_extra_body={"guided_regex": SCORING_REGEX},
    )
    with use_judge(settings):
        client = ai.OpenAI(api_key="k")
        client._client.chat.completions = Completions()
        cfg = ai.AutoInterpEvalConfig(n_ex_for_scoring=3, n_correct_for_scoring=1)
        interp = ai.AutoInterp.__new__(ai.AutoInterp)
        interp.cfg = cfg
        examples = ai.Examples([])
        examples.examples = [type("E", (), {"to_str": lambda self, mark_toks=False: "text"})()]
        scoring = ai.AutoInterp.get_scoring_prompts(interp, explanation="words", scoring_examples=examples)
        client.chat.completions.create(model="gpt-4o-mini", messages=scoring, max_tokens=5)
        client.chat.completions.create(model="gpt-4o-mini", messages=list(scoring), max_tokens=30)
    assert ai.OpenAI.__name__ == "OpenAI"  # restored
    assert [kw["model"] for kw in sent] == ["local-judge", "local-judge"]
    assert sent[0]["extra_body"] == {"temperature": 0, "guided_regex": SCORING_REGEX}
    assert sent[1]["extra_body"] == {"temperature": 0}
