"""Secrets kept out of what the pipeline writes: a URL's user-info, query string and fragment, and request-body
fields whose name looks like a secret (``api_key``, ``Authorization``, ``access_token``, ...).

The config may carry such secrets in two places: ``eval.autointerp.base_url`` (``https://user:pass@host/v1``,
``...?api-key=...``) and the judge's ``extra_body`` / ``scoring_extra_body``. :func:`redact_config` rewrites a
config's plain data with them replaced by :data:`REDACTED` (every key named ``url`` or ``*_url``, every mapping
under a key containing ``extra_body``); :func:`redact_override` does the same to a command-line override. Both are
idempotent, so a redacted config hashes as itself. :func:`is_loopback_host` tells which hosts a key may reach
over plain HTTP.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: What a secret is replaced with.
REDACTED = "<redacted>"
#: Name parts (split at ``_``, ``-``, ``.``, spaces and camelCase) that make a field a secret.
SECRET_PARTS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "cookie",
        "signature",
        "bearer",
        "session",
    }
)
_URL_KEY = re.compile(r"(^|[_.-])url$", re.IGNORECASE)
_BODY_KEY = "extra_body"
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s,'\"}\]]+")
_PAIR = re.compile(r"(?P<name>[A-Za-z_][\w-]*)(?P<sep>\s*:\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^,}\]]*)")


def name_parts(name: str) -> list[str]:
    """``"xApiKey"`` / ``"x-api-key"`` / ``"api_key"`` -> ``["x", "api", "key"]`` (lower case)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    return [p.lower() for p in re.split(r"[\s_.\-]+", spaced) if p]


def is_secret_name(name: str) -> bool:
    """Whether a field called ``name`` likely holds a secret (one of its parts is in :data:`SECRET_PARTS`)."""
    return any(p in SECRET_PARTS for p in name_parts(name))


def redact_url(url: str) -> str:
    """``url`` with its user-info, query string and fragment replaced by :data:`REDACTED` (anything that is not a
    ``scheme://`` URL is returned as is)."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit(
        (
            parts.scheme,
            netloc,
            parts.path,
            REDACTED if parts.query else "",
            REDACTED if parts.fragment else "",
        )
    )


def redact_text(text: str) -> str:
    """Every ``scheme://...`` URL inside ``text`` through :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_secrets(node: Any) -> Any:
    """A copy of ``node`` with the value of every secret-named mapping key (:func:`is_secret_name`), at any depth,
    replaced by :data:`REDACTED`."""
    if isinstance(node, Mapping):
        return {k: REDACTED if is_secret_name(str(k)) else redact_secrets(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact_secrets(v) for v in node]
    return node


def redact_config(node: Any) -> Any:
    """A copy of a config's plain data (dicts, lists, scalars) with the secrets replaced by :data:`REDACTED`: the
    value of every key named ``url`` or ``*_url`` through :func:`redact_url`, and every mapping under a key that
    contains ``extra_body`` through :func:`redact_secrets`."""
    if isinstance(node, Mapping):
        out = {}
        for k, v in node.items():
            if _BODY_KEY in str(k) and isinstance(v, Mapping):
                out[k] = redact_secrets(v)
            elif _URL_KEY.search(str(k)) and isinstance(v, str):
                out[k] = redact_url(v)
            else:
                out[k] = redact_config(v)
        return out
    if isinstance(node, (list, tuple)):
        return [redact_config(v) for v in node]
    return node


def redact_override(override: str) -> str:
    """A command-line override (``key=value``, ``+key=value``, ...) with its secrets replaced: a ``*url`` key's URL,
    an ``extra_body`` entry whose name is a secret, the secret-named entries of an ``extra_body`` mapping; and any
    URL in the value."""
    key, sep, value = str(override).partition("=")
    if not sep:
        return override
    path = key.lstrip("+~").split("@")[0]
    if _BODY_KEY in path:
        tail = path.split(_BODY_KEY, 1)[1].lstrip(".")
        if tail and any(is_secret_name(p) for p in tail.split(".")):
            return f"{key}={REDACTED}"
        value = _PAIR.sub(
            lambda m: f"{m['name']}{m['sep']}{REDACTED}" if is_secret_name(m["name"]) else m.group(0), value
        )
    if _URL_KEY.search(path):
        quote = value[:1] if value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1 else ""
        inner = value[1:-1] if quote else value
        value = f"{quote}{redact_url(inner) if '://' in inner else inner}{quote}"
    return f"{key}={redact_text(value)}"


_BODY_ENTRY = re.compile(r"(?P<key>[\w.+~-]*extra_body[\w.-]*\.(?P<name>[\w-]+))=(?P<value>[^,]*)")


def redact_overrides_text(text: str) -> str:
    """Overrides joined into one string (Hydra's ``hydra.job.override_dirname``, ``key=value,key=value``, whose
    values may themselves hold commas): every URL, every secret-named ``extra_body`` entry and every secret-named
    ``name: value`` pair redacted."""
    text = redact_text(text)
    text = _BODY_ENTRY.sub(lambda m: f"{m['key']}={REDACTED}" if is_secret_name(m["name"]) else m.group(0), text)
    return _PAIR.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}" if is_secret_name(m["name"]) else m.group(0), text)


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` (a URL's host name, IPv6 without brackets) is this machine: ``localhost`` (or a name under
    ``.localhost``), 127.0.0.0/8 or ::1. No name is resolved."""
    if not host:
        return False
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "REDACTED",
    "SECRET_PARTS",
    "is_loopback_host",
    "is_secret_name",
    "redact_config",
    "redact_override",
    "redact_overrides_text",
    "redact_secrets",
    "redact_text",
    "redact_url",
]
