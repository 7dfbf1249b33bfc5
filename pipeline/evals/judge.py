"""The autointerp judge: any OpenAI-compatible chat-completions endpoint, in place of the one SAEBench hard-codes.

SAEBench 0.6.0's autointerp builds ``OpenAI(api_key=...)`` and asks for ``model="gpt-4o-mini"`` inside
``AutoInterp.get_api_response``. :func:`use_judge` swaps the module's ``OpenAI`` for :class:`JudgeClient`, which
points the official ``openai`` client at ``base_url`` (OpenAI, vLLM, llama.cpp's ``llama-server``, ``transformers
serve``, ...) and sends the configured model name instead. This is the one place SAEBench's model name is
overridden. Servers that only answer streamed completions (``transformers serve`` 4.57) are asked for a stream
(``stream=True``), joined back into the one completion SAEBench reads.

Server-specific request options go in ``extra_body`` (every request) and ``scoring_extra_body`` (the scoring
requests only: SAEBench expects comma-separated example numbers or "None" there, which a small judge rarely writes
unprompted, so constrained decoding, e.g. llama.cpp's ``grammar`` or vLLM's ``guided_regex``, belongs there). The
scoring requests are told apart exactly: SAEBench's ``get_scoring_prompts`` is wrapped to return
:class:`ScoringMessages`.

Keys (:func:`judge_api_key`): OpenAI's API gets ``$OPENAI_API_KEY`` (or the variable ``api_key_env`` names); a
``base_url`` gets a key only from the variable ``api_key_env`` names, never ``$OPENAI_API_KEY`` by default, and
never over plain HTTP to another machine (:func:`pipeline.evals.config.check_judge_endpoint`). While the judge is
in use, the HTTP client's request log (which prints each request's URL) is kept at WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

#: The judge SAEBench's published autointerp scores come from.
SAEBENCH_JUDGE = "gpt-4o-mini"
#: The key sent to a local endpoint when no key is configured (local servers do not check it; the client needs one).
NO_KEY = "no-key"
#: Where OpenAI's key is read from when ``api_key_env`` names no other variable (OpenAI's API only).
OPENAI_KEY_ENV = "OPENAI_API_KEY"
#: Loggers that print each request's URL at INFO (a URL may carry a key in its query string or user-info).
REQUEST_LOGGERS = ("httpx", "openai")
#: What SAEBench's scoring step parses (``AutoInterp.parse_predictions``): "None" or comma-separated example
#: numbers. As a llama.cpp GBNF grammar (``scoring_extra_body: {grammar: ...}``) ...
SCORING_GRAMMAR = 'root ::= "None" | num (", " num)*\nnum ::= [1-9] [0-9]?'
#: ... and as a regular expression (vLLM: ``scoring_extra_body: {guided_regex: ...}``).
SCORING_REGEX = r"None|[1-9][0-9]?(, [1-9][0-9]?)*"


@dataclass
class JudgeCalls:
    """What the judge was asked, for ``eval_info.json``."""

    requests: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, ok: bool) -> None:
        with self._lock:  # SAEBench calls the judge from a thread pool
            self.requests += 1
            self.failures += not ok


class ScoringMessages(list):
    """The messages of a scoring request (what SAEBench's ``get_scoring_prompts`` returns, marked)."""


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and what each request carries (the ``eval.autointerp`` node's judge fields)."""

    base_url: str | None
    """OpenAI-compatible endpoint; None: OpenAI."""
    model: str
    stream: bool = False
    timeout_s: float = 120.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    scoring_extra_body: dict[str, Any] = field(default_factory=dict)


class JudgeClient:
    """Stands in for ``openai.OpenAI`` inside SAEBench's autointerp: ``chat.completions.create(**kw)`` goes to
    ``base_url`` with ``model`` replaced and the extra request options added; with ``stream``, the answer is
    requested as a stream and joined."""

    def __init__(self, *, api_key: str, settings: JudgeSettings, calls: JudgeCalls) -> None:
        from openai import OpenAI

        self._client = OpenAI(api_key=api_key, base_url=settings.base_url, timeout=settings.timeout_s)
        self.settings, self.calls = settings, calls
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs: Any) -> Any:
        s = self.settings
        kwargs["model"] = s.model
        extra = {
            **s.extra_body,
            **(s.scoring_extra_body if isinstance(kwargs.get("messages"), ScoringMessages) else {}),
        }
        if extra:
            kwargs["extra_body"] = {**kwargs.get("extra_body", {}), **extra}
        stream = s.stream
        try:
            out = self._joined(kwargs) if stream else self._client.chat.completions.create(**kwargs)
        except Exception:
            self.calls.count(False)
            raise
        self.calls.count(True)
        return out

    def _joined(self, kwargs: dict[str, Any]) -> Any:
        """One streamed completion, joined into the shape SAEBench reads (``choices[i].message.content``)."""
        parts: dict[int, list[str]] = {i: [] for i in range(kwargs.get("n") or 1)}
        for chunk in self._client.chat.completions.create(**{**kwargs, "stream": True}):
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    parts.setdefault(choice.index, []).append(choice.delta.content)
        return SimpleNamespace(
            choices=[SimpleNamespace(message=SimpleNamespace(content="".join(parts[i]))) for i in sorted(parts)]
        )


def key_variable(base_url: str | None, api_key_env: str | None) -> str | None:
    """The environment variable the judge's key comes from: ``api_key_env``, else ``$OPENAI_API_KEY`` for
    OpenAI's API (no ``base_url``), else none (a custom endpoint gets no key unless its variable is named)."""
    if api_key_env:
        return api_key_env
    return OPENAI_KEY_ENV if base_url is None else None


def judge_api_key(base_url: str | None, api_key_env: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The key sent to the judge: the value of :func:`key_variable`, or :data:`NO_KEY` when it names none or the
    variable is unset. ``ValueError`` (:func:`pipeline.evals.config.check_judge_endpoint`) when a key would go
    over plain HTTP to another machine."""
    from pipeline.evals.config import check_judge_endpoint

    check_judge_endpoint(base_url, api_key_env)
    name = key_variable(base_url, api_key_env)
    value = (os.environ if environ is None else environ).get(name) if name else None
    return value or NO_KEY


@contextlib.contextmanager
def quiet_request_logs() -> Iterator[None]:
    """Keep :data:`REQUEST_LOGGERS` at WARNING or above for the duration (restored after)."""
    loggers = [logging.getLogger(name) for name in REQUEST_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def use_judge(settings: JudgeSettings) -> Iterator[JudgeCalls]:
    """Within the block, SAEBench's autointerp asks the judge of ``settings``; yields the request counts."""
    import sae_bench.evals.autointerp.main as ai

    from pipeline.evals.saebench_patches import patched_attr

    calls = JudgeCalls()
    scoring_prompts = ai.AutoInterp.get_scoring_prompts

    def make(api_key: str, **_: Any) -> JudgeClient:
        return JudgeClient(api_key=api_key, settings=settings, calls=calls)

    def marked(self: Any, *args: Any, **kwargs: Any) -> ScoringMessages:
        return ScoringMessages(scoring_prompts(self, *args, **kwargs))

    with (
        patched_attr(ai, "OpenAI", make),
        patched_attr(ai.AutoInterp, "get_scoring_prompts", marked),
        quiet_request_logs(),
    ):
        yield calls


__all__ = [
    "JudgeCalls",
    "JudgeClient",
    "JudgeSettings",
    "NO_KEY",
    "OPENAI_KEY_ENV",
    "SAEBENCH_JUDGE",
    "SCORING_GRAMMAR",
    "SCORING_REGEX",
    "ScoringMessages",
    "judge_api_key",
    "key_variable",
    "quiet_request_logs",
    "use_judge",
]
