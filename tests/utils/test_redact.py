"""Secrets in the config (a judge's ``base_url`` with user-info or a query string, secret-named ``extra_body``
fields) stay out of what the pipeline writes: the stage folders' ``config.yaml``, Hydra's ``.hydra/`` files and
the config the report prints."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from pipeline.runs.layout import prepare, stage_dir
from pipeline.utils.redact import REDACTED, is_loopback_host, is_secret_name, redact_config, redact_override, redact_url
from tests.conftest import CONF, REPO, compose_config

SECRETS = ("hunter2", "s3cr3t", "tok-123", "sig-456")
URL = "https://alice:hunter2@judge.example.com:8443/v1?api-key=s3cr3t#frag"
OVERRIDES = (
    f"eval.autointerp.base_url='{URL}'",
    "+eval.autointerp.extra_body={temperature: 0, api_key: tok-123}",
    "+eval.autointerp.scoring_extra_body.x-signature=sig-456",
)


def _clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, secret


@pytest.mark.parametrize(
    "url, want",
    [
        (URL, f"https://{REDACTED}@judge.example.com:8443/v1?{REDACTED}#{REDACTED}"),
        ("http://localhost:8000/v1", "http://localhost:8000/v1"),
        ("http://token@host/v1", f"http://{REDACTED}@host/v1"),
        ("not a url", "not a url"),
    ],
)
def test_urls_lose_user_info_query_and_fragment(url, want):
    assert redact_url(url) == want
    assert redact_url(redact_url(url)) == want  # idempotent: a redacted config hashes as itself


@pytest.mark.parametrize("name", ["api_key", "apiKey", "x-api-key", "Authorization", "access_token", "password"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["temperature", "max_tokens", "grammar", "guided_regex", "top_k", "stop"])
def test_plain_names(name):
    assert not is_secret_name(name)


def test_config_redaction_keeps_everything_else():
    node = {
        "eval": {
            "autointerp": {
                "base_url": URL,
                "model": "judge",
                "api_key_env": "JUDGE_KEY",
                "extra_body": {"temperature": 0, "api_key": "tok-123", "nested": {"token": "tok-123"}},
                "scoring_extra_body": {"grammar": "root ::= x", "x-signature": "sig-456"},
            }
        },
        "harvest": {"n_tokens": 100},
    }
    out = redact_config(node)
    _clean(str(out))
    a = out["eval"]["autointerp"]
    assert a["model"] == "judge" and a["api_key_env"] == "JUDGE_KEY" and a["extra_body"]["temperature"] == 0
    assert a["scoring_extra_body"]["grammar"] == "root ::= x" and a["extra_body"]["api_key"] == REDACTED
    assert out["harvest"] == node["harvest"] and node["eval"]["autointerp"]["base_url"] == URL  # a copy


def test_override_redaction():
    _clean(" ".join(redact_override(o) for o in OVERRIDES))
    assert redact_override("dictionary.coder.k=8") == "dictionary.coder.k=8"
    assert "temperature: 0" in redact_override(OVERRIDES[1])


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.3.2.1", "::1", "api.localhost"])
def test_loopback_hosts(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["example.com", "10.0.0.2", "localhost.example.com", "", None])
def test_other_hosts(host):
    assert not is_loopback_host(host)


def test_stage_config_yaml_is_redacted(tmp_path):
    """What layout.prepare writes into every stage folder (and what the stage hash covers)."""
    cfg = compose_config(f"output_root={tmp_path}", *OVERRIDES)
    for stage in ("evaluate", "report"):
        folder = prepare(stage_dir(cfg, stage), cfg, stage)
        text = (folder / "config.yaml").read_text()
        _clean(text)
        assert "judge.example.com:8443/v1" in text and "temperature: 0" in text


def test_the_report_is_handed_a_redacted_config(tmp_path, monkeypatch):
    """The report stage prints the config it is given; the orchestrator gives it the redacted one (same folder)."""
    from stages import orchestrator

    seen = {}

    def report(cfg):
        seen["yaml"], seen["folder"] = OmegaConf.to_yaml(cfg), stage_dir(cfg, "report")
        return seen["folder"]

    monkeypatch.setitem(orchestrator.RUNNERS, "report", report)
    cfg = compose_config(f"output_root={tmp_path}", "stage=report", *OVERRIDES)
    orchestrator.run_pipeline(cfg)
    _clean(seen["yaml"])
    assert seen["folder"] == stage_dir(cfg, "report")


def test_the_report_stage_alone_prints_a_redacted_config(tmp_path):
    """Run on its own, the report stage redacts the config it prints at the end of report.md."""
    from stages import report

    cfg = compose_config(f"output_root={tmp_path}", "stage=report", *OVERRIDES)
    folder = report.run(cfg, eval_folders=[])
    text = (folder / "report.md").read_text()
    assert "## Config" in text and "judge.example.com" in text
    _clean(text)


APP = """
import sys
import hydra
from pipeline.runs.config import register_configs

register_configs()

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="config")
def main(cfg):
    print("ran")

sys.argv = [sys.argv[0], *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("multirun", [False, True])
def test_hydra_output_folder_is_redacted(tmp_path, multirun):
    """Hydra writes the composed config, its own config and the overrides into ``.hydra/`` (and a sweep's
    ``multirun.yaml``); the callback conf/config.yaml registers rewrites them redacted before the job runs."""
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(APP.format(conf=str(CONF))))
    args = [f"output_root={tmp_path / 'out'}", *OVERRIDES]
    if multirun:
        args = ["-m", *args, "dictionary.coder.k=4,8"]
    done = subprocess.run(
        [sys.executable, str(app), *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ran") == (2 if multirun else 1)
    written = [p for p in (tmp_path / "out").rglob("*.yaml")]
    names = {p.name for p in written}
    assert {"config.yaml", "hydra.yaml", "overrides.yaml"} <= names
    assert ("multirun.yaml" in names) == multirun
    for path in written:
        text = path.read_text()
        _clean(text)
        if path.name in ("config.yaml", "multirun.yaml"):
            assert "judge.example.com:8443/v1" in text
        OmegaConf.load(path)  # still YAML
