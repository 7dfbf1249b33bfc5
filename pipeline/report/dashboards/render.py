"""Static HTML of the dashboards (Jinja2): one page per SAE with a card per latent, and an index of the SAEs.

Pages are self-contained (inline CSS and SVG, no script, no network), so they open from disk. Autoescape is on:
token strings, a judge's explanation, names and skip reasons show as text. The only markup passed through
unescaped is the project's own: :data:`STYLE`, :data:`~pipeline.report.escape.CSP_META` (first in every head: no
script runs) and :func:`hist`'s SVG, built from numbers alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from pipeline.report.dashboards.features import Context, LatentView
from pipeline.report.escape import CSP_META, local_href
from pipeline.utils.atomic import atomic_write_text

#: The dashboards folder's index (beside one page per SAE, ``<name>.html``).
INDEX_FILE = "index.html"

#: The pages' CSS (the report's pages use it too): a project constant, trusted (``Markup``) so that autoescape leaves
#: its ``>`` selectors alone inside ``<style>``.
STYLE = Markup("""
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 0; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; border-bottom: 1px solid #ddd; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em 1em; margin: 1.2em 0; }
.meta { color: #555; font-size: 0.9em; }
.ctx { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; margin: 2px 0;
       line-height: 1.6; }
.tok { border-radius: 2px; } .focus { outline: 1.5px solid #b30000; }
.val { color: #777; display: inline-block; width: 5.5em; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; } .cols > div { min-width: 14em; }
.up { color: #05620b; } .down { color: #9b0d0d; }
.reason { font-size: 0.75em; background: #eef; border-radius: 3px; padding: 1px 5px; margin-left: 0.5em; }
.explanation { background: #f6f6e8; padding: 4px 8px; border-radius: 4px; }
""")

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

_CONTEXT = """{% macro context(c, top) %}<div class="ctx"><span class="val">{{ '%.3g'|format(c.value) }}</span>
{%- for text, a in c.tokens -%}
<span class="tok{{ ' focus' if loop.index0 == c.focus }}" title="{{ '%.4g'|format(a) }}"
 style="background: rgba(255,130,0,{{ '%.2f'|format([a / top, 1.0]|min if top > 0 else 0) }})">{{ show(text) }}</span>
{%- endfor %}</div>{% endmacro %}"""

SAE_PAGE = _ENV.from_string(
    _CONTEXT
    + """<!doctype html>
<html lang="en"><head><meta charset="utf-8">{{ csp }}<title>{{ name }}: feature dashboards</title>
<style>{{ style }}</style></head><body>
<p><a href="{{ index }}">&larr; all SAEs</a></p>
<h1>{{ name }}</h1>
<p class="meta">{{ summary.width }} latents; {{ summary.rows }} store rows read ({{ summary.source }});
mean L0 {{ '%.1f'|format(summary.l0) }}; {{ summary.dead }} latents never fire on them.</p>
<p class="meta">Top activations: the {{ n_top }} rows where the latent is largest. Intervals: its non-zero
activations cut at quantiles, a few rows sampled from each. Highlight: the latent's activation on each token,
relative to its maximum (hover for the value; the framed token is the one the row is). Logits: the decoder
direction through the final norm's scale and the unembedding (the direct path only).</p>
<table><tr><th>latent</th><th>why drawn</th><th>frequency</th><th>max</th></tr>
{% for v in views %}<tr><td><a href="#latent-{{ v.index }}">{{ v.index }}</a></td><td>{{ v.reason }}</td>
<td>{{ '%.3g'|format(v.frequency) }}</td><td>{{ '%.3g'|format(v.max_value) }}</td></tr>
{% endfor %}</table>
{% for v in views %}
<div class="card latent" id="latent-{{ v.index }}">
<h2>Latent {{ v.index }}<span class="reason">{{ v.reason }}</span></h2>
<p class="meta">fires on {{ v.count }} of {{ summary.rows }} rows (frequency {{ '%.3g'|format(v.frequency) }});
max {{ '%.4g'|format(v.max_value) }}, mean when active {{ '%.4g'|format(v.mean_value) }}</p>
{% if v.explanation is not none %}<p class="explanation">Judge's explanation: {{ v.explanation }}
{% if v.judge_score is not none %}(score {{ '%.2f'|format(v.judge_score) }}){% endif %}</p>{% endif %}
<div class="cols">
<div>{{ hist(v.histogram) }}</div>
<div><b class="up">Promoted</b><table>{% for t, w in v.promoted %}<tr><td>{{ show(t) }}</td>
<td class="up">{{ '%+.3f'|format(w) }}</td></tr>{% endfor %}</table></div>
<div><b class="down">Suppressed</b><table>{% for t, w in v.suppressed %}<tr><td>{{ show(t) }}</td>
<td class="down">{{ '%+.3f'|format(w) }}</td></tr>{% endfor %}</table></div>
</div>
<h3>Top activations</h3>
{% for c in v.top %}{{ context(c, v.max_value) }}{% else %}<p class="meta">never fires on the rows read</p>{% endfor %}
{% for lo, hi, cs in v.intervals %}<h3>Interval {{ '%.3g'|format(lo) }} &ndash; {{ '%.3g'|format(hi) }}</h3>
{% for c in cs %}{{ context(c, v.max_value) }}{% endfor %}{% endfor %}
</div>
{% endfor %}
</body></html>
"""
)

INDEX_PAGE = _ENV.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{{ csp }}<title>Feature dashboards</title><style>{{ style }}</style></head>
<body>
<h1>Feature dashboards</h1>
<p class="meta">{{ note }}</p>
<table><tr><th>SAE</th><th>latents</th><th>drawn</th><th>rows read</th><th>mean L0</th><th>never fire</th></tr>
{% for s in saes %}<tr><td><a href="{{ local_href(s.page) }}">{{ s.name }}</a></td><td>{{ s.width }}</td>
<td>{{ s.drawn }}</td><td>{{ s.rows }}</td><td>{{ '%.1f'|format(s.l0) }}</td><td>{{ s.dead }}</td></tr>
{% endfor %}</table>
{% if skipped %}<h2>Not drawn</h2><ul>{% for s in skipped %}<li>{{ s.what }}: {{ s.reason }}</li>{% endfor %}</ul>
{% endif %}
</body></html>
""")


def show(text: str) -> str:
    """A token as displayed: newlines and tabs made visible."""
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5") if text else "\u2205"


def hist(bins: list[tuple[float, float, int]], width: int = 260, height: int = 70) -> Any:
    """An inline SVG bar chart of a latent's activation histogram (x: activation, y: rows). Trusted markup: every
    value in it goes through ``float`` / ``int`` first."""
    if not bins:
        return ""
    bins = [(float(lo), float(hi), int(c)) for lo, hi, c in bins]
    width, height = int(width), int(height)
    top = max(c for _, _, c in bins) or 1
    w = width / len(bins)
    bars = "".join(
        f'<rect x="{i * w:.1f}" y="{height - c / top * height:.1f}" width="{max(w - 1, 1):.1f}" '
        f'height="{c / top * height:.1f}" fill="#e07b00"><title>{lo:.3g}-{hi:.3g}: {c}</title></rect>'
        for i, (lo, hi, c) in enumerate(bins)
    )
    axis = (
        f'<text x="0" y="{height + 12}" font-size="10">{bins[0][0]:.3g}</text>'
        f'<text x="{width}" y="{height + 12}" font-size="10" text-anchor="end">{bins[-1][1]:.3g}</text>'
    )
    return Markup(
        f'<svg class="hist" width="{width}" height="{height + 14}" role="img" aria-label="activation histogram">'
        f"{bars}{axis}</svg>"
    )


_ENV.globals.update(show=show, hist=hist, style=STYLE, csp=CSP_META, local_href=local_href)


def write_sae_page(
    path: Path, name: str, views: list[LatentView], summary: dict[str, Any], n_top: int, index: str = INDEX_FILE
) -> None:
    """One SAE's page (atomic)."""
    atomic_write_text(path, SAE_PAGE.render(name=name, views=views, summary=summary, n_top=n_top, index=index))


def write_index(path: Path, saes: list[dict[str, Any]], skipped: list[dict[str, str]], note: str) -> None:
    """The index of the SAEs' pages (atomic)."""
    atomic_write_text(path, INDEX_PAGE.render(saes=saes, skipped=skipped, note=note))


__all__ = ["INDEX_FILE", "Context", "write_index", "write_sae_page"]
