"""A run's ``index.html``, beside ``report.md``: the report as HTML, its plots and every SAE's feature dashboards,
linked with relative paths so the folder opens from disk with no server.

Both pages are Jinja2 templates with autoescape on; ``report.md`` is rendered with raw HTML off (its interpolated
text is escaped for markdown too: :mod:`pipeline.report.escape`), so what it holds shows as text. Each page
carries :data:`~pipeline.report.escape.CSP_META`: no script runs, even one that got in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt
from markupsafe import Markup

from pipeline.report.dashboards import SUMMARY_FILE as DASHBOARDS_SUMMARY
from pipeline.report.dashboards.render import STYLE
from pipeline.report.escape import CSP_META, local_href
from pipeline.utils.atomic import atomic_write_text

#: The run's entry page, in the report folder.
INDEX_FILE = "index.html"
#: ``report.md`` rendered to HTML, beside it.
REPORT_HTML = "report.html"

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_ENV.globals.update(csp=CSP_META, style=STYLE)  # trusted: the project's constants

PAGE = _ENV.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{{ csp }}<title>{{ title }}</title><style>{{ style }}</style></head>
<body>
<h1>{{ title }}</h1>
<ul>
<li><a href="{{ report_html }}">The report</a> (<a href="{{ report_md }}">markdown</a>)</li>
</ul>
<h2>Feature dashboards</h2>
{% for group in dashboards %}
<p class="meta">{{ group.folder }}: {{ group.note }}</p>
<ul>{% for s in group.saes %}<li><a href="{{ s.href }}">{{ s.name }}</a>: {{ s.drawn }} latents drawn of {{ s.width }}
</li>{% endfor %}</ul>
{% for s in group.skipped %}<p class="meta">{{ s.what }}: {{ s.reason }}</p>{% endfor %}
{% else %}<p class="meta">No dashboards: the dashboards stage has not run for this experiment.</p>{% endfor %}
<h2>Plots</h2>
{% for p in plots %}<figure><a href="{{ p.href }}"><img src="{{ p.href }}" alt="{{ p.name }}" style="max-width: 560px">
</a><figcaption class="meta">{{ p.name }}</figcaption></figure>{% else %}<p class="meta">none</p>{% endfor %}
</body></html>
""")

REPORT_PAGE = _ENV.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{{ csp }}<title>{{ title }}</title><style>{{ style }}
img { max-width: 100%; } table { display: block; overflow-x: auto; }
pre { background: #f5f5f5; padding: 0.5em; overflow-x: auto; }</style></head><body>
<p><a href="{{ index }}">&larr; index</a></p>
{{ body }}
</body></html>
""")


def render_markdown(text: str) -> Markup:
    """``text`` (markdown) as HTML: CommonMark and tables, raw HTML off (a ``<tag>`` in it shows as text), link
    targets checked by markdown-it (no ``javascript:`` / ``vbscript:`` / ``file:`` URL); every text node escaped,
    so the result is safe markup."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    return Markup(md.render(text))


def write_index(report_folder: Path, report_md: Path, dashboards_folders: list[Path], title: str) -> Path:
    """Write ``report.html`` (``report_md`` rendered) and ``index.html`` into ``report_folder``; returns the index.
    ``title``: plain text (escaped here)."""
    body = render_markdown(report_md.read_text(encoding="utf-8"))
    atomic_write_text(report_folder / REPORT_HTML, REPORT_PAGE.render(title=title, body=body, index=INDEX_FILE))
    groups = []
    for folder in dashboards_folders:
        summary_path = folder / DASHBOARDS_SUMMARY
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
        rel = Path(os.path.relpath(folder, report_folder))
        groups.append(
            {
                "folder": folder.name,
                "note": summary.get("note", "no dashboards drawn"),
                "saes": [{**s, "href": local_href((rel / s["page"]).as_posix())} for s in summary.get("saes", [])],
                "skipped": summary.get("skipped", []),
            }
        )
    plots = [{"href": local_href(p.name), "name": p.name} for p in sorted(report_folder.glob("*.png"))]
    path = report_folder / INDEX_FILE
    atomic_write_text(
        path,
        PAGE.render(
            title=title,
            report_html=REPORT_HTML,
            report_md=local_href(report_md.name),
            dashboards=groups,
            plots=plots,
        ),
    )
    return path


__all__ = ["INDEX_FILE", "REPORT_HTML", "render_markdown", "write_index"]
