"""Where the autointerp judge's API key goes: OpenAI's key only to OpenAI, a custom endpoint's key only when the
config names its variable (``eval.autointerp.api_key_env``), never over plain HTTP to another machine; and what
``eval_info.json`` records of the endpoint (no user-info, query string or secret-named request field)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.evals.config import AutointerpConfig, EvalConfig, validate_eval_config
from pipeline.evals.judge import NO_KEY
from pipeline.evals.metrics.autointerp import AutointerpRunner
from pipeline.evals.metrics.base import EvalContext


def _ctx(tmp_path: Path, node: AutointerpConfig) -> EvalContext:
    return EvalContext(
        model=SimpleNamespace(),
        model_config=SimpleNamespace(name="tiny"),
        n_params=1,
        saes=[],
        results_dir=tmp_path / "eval_results",
        artifacts_dir=tmp_path / "artifacts",
        device="cpu",
        llm_dtype="float32",
        llm_batch_size=1,
        force_rerun=False,
        store=None,
        text_source=None,
        labelled=None,
        eval=EvalConfig(autointerp=node),
        hub_reachable=True,
        info={"sizes": {}, "notes": []},
    )


def _sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **node: object) -> tuple[str | None, object, dict]:
    """Run the autointerp runner with SAEBench's ``run_eval`` replaced: the key it would hand the client (None when
    the runner skipped), the client it would build, and ``eval_info.json``'s record."""
    import sae_bench.evals.autointerp.main as ai
    from sae_bench.evals.autointerp.eval_config import AutoInterpEvalConfig

    seen: dict[str, object] = {}

    def run_eval(config, selected, device, api_key, *args, **kwargs):  # STUB: no SAEBench run, no judge
        seen["key"], seen["client"] = api_key, ai.OpenAI(api_key=api_key)

    monkeypatch.setattr(ai, "run_eval", run_eval)
    a = AutointerpConfig(**node)
    ctx = _ctx(tmp_path, a)
    runner = AutointerpRunner()
    if runner.requirements(ctx) is not None:
        return None, None, ctx.info
    runner.run(ctx, AutoInterpEvalConfig(model_name="tiny"))
    return seen["key"], seen["client"], ctx.info


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("JUDGE_KEY", "judge-secret")


def test_a_custom_endpoint_gets_no_openai_key(tmp_path, monkeypatch):
    key, client, _ = _sent(tmp_path, monkeypatch, base_url="http://localhost:8000/v1", model="judge")
    assert key == NO_KEY


def test_openai_gets_the_openai_key(tmp_path, monkeypatch):
    key, _, _ = _sent(tmp_path, monkeypatch)
    assert key == "sk-openai-secret"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert _sent(tmp_path, monkeypatch)[0] is None  # skipped: no key, no base_url


@pytest.mark.parametrize("url", ["https://judge.example.com/v1", "http://127.0.0.1:8000/v1", "http://[::1]:8/v1"])
def test_a_named_key_goes_to_its_endpoint(tmp_path, monkeypatch, url):
    key, client, _ = _sent(tmp_path, monkeypatch, base_url=url, model="judge", api_key_env="JUDGE_KEY")
    assert key == "judge-secret"
    assert str(client._client.base_url).rstrip("/") == url  # the client still gets the real endpoint


def test_no_key_over_plain_http_to_another_machine(tmp_path, monkeypatch):
    node = dict(base_url="http://judge.example.com/v1", model="judge", api_key_env="JUDGE_KEY")
    with pytest.raises(ValueError, match=r"eval\.autointerp\.api_key_env.*plain HTTP.*judge\.example\.com"):
        validate_eval_config(EvalConfig(autointerp=AutointerpConfig(**node)))
    with pytest.raises(ValueError, match="plain HTTP"):
        _sent(tmp_path, monkeypatch, **node)


def test_a_named_but_unset_key_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("JUDGE_KEY")
    a = AutointerpConfig(base_url="https://judge.example.com/v1", api_key_env="JUDGE_KEY")
    reason = AutointerpRunner().requirements(_ctx(tmp_path, a))
    assert reason is not None and "$JUDGE_KEY" in reason


@pytest.mark.parametrize("url", ["ftp://judge.example.com/v1", "localhost:8000/v1", "judge", "http:///v1"])
def test_a_base_url_must_be_http(url):
    with pytest.raises(ValueError, match=r"eval\.autointerp\.base_url.*http"):
        validate_eval_config(EvalConfig(autointerp=AutointerpConfig(base_url=url)))


def test_eval_info_records_the_endpoint_without_secrets(tmp_path, monkeypatch):
    url = "https://alice:hunter2@judge.example.com/v1?api-key=s3cr3t"
    _, client, info = _sent(
        tmp_path,
        monkeypatch,
        base_url=url,
        model="judge",
        api_key_env="JUDGE_KEY",
        extra_body={"temperature": 0, "api_key": "tok-123"},
        scoring_extra_body={"grammar": "g", "Authorization": "Bearer tok-456"},
    )
    text = str(info)
    for secret in ("hunter2", "s3cr3t", "tok-123", "tok-456", "judge-secret", "sk-openai-secret"):
        assert secret not in text, secret
    judge = info["sizes"]["autointerp"]["judge"]
    assert "judge.example.com/v1" in judge["base_url"] and judge["extra_body"]["temperature"] == 0
    assert judge["scoring_extra_body"]["grammar"] == "g"
    assert client.settings.extra_body["api_key"] == "tok-123"  # the requests still carry them
