"""What a generated page may show: text the project does not control (skip reasons, failure messages, notes,
labelled titles, SAE and experiment names, token strings, a judge's explanation) only as text, never as an
element; every page keeps its own CSS and carries a Content-Security-Policy that forbids scripts.

The hostile strings go in where the evaluate stage and the judge put them (``eval_info.json``, ``skipped.json``,
``failed.json`` written by the evaluate stage's writers, the labelled data's summary, autointerp's explanations)
and come out through the real writers (:func:`stages.report.run`, :func:`pipeline.report.dashboards.build_dashboards`).
The last test opens every page in headless Chromium (``tests/utils/browser.py``)."""

from __future__ import annotations

import json
import re
import types
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt
from omegaconf import OmegaConf

from pipeline.report.escape import CSP

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '"><img src=x onerror="document.title=\'pwned\'">'
TICK = "x` <img src=x onerror=alert(1)>"
PAYLOADS = (SCRIPT, IMG, TICK)
#: A value for a table cell: a pipe and a line break would split the cell and end the row.
ROW_BREAKER = "cpu | <img src=x onerror=alert(2)>\n| injected | row |"
#: The SAE names: the dictionary's, and a baseline's that carries a payload (a name becomes a file and a link).
DICT_NAME, BASE_NAME = "dbksvd_plain_K64_k4", TICK


class Scan(HTMLParser):
    """Every element (tag, attributes) and the text of an HTML document, character references decoded."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.chunks: list[str] = []
        self.feed(page)
        self.close()
        self.text = "".join(self.chunks)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)


def assert_inert(page: str, shows: tuple[str, ...] = ()) -> Scan:
    """No script element, no event-handler attribute, no image but a local PNG, the CSP meta present, the title not
    rewritten; each of ``shows`` in the page's text."""
    scan = Scan(page)
    assert [t for t, _ in scan.elements if t in ("script", "iframe", "object", "embed")] == []
    assert [(t, a) for t, attrs in scan.elements for a in attrs if a.lower().startswith("on")] == []
    assert all((attrs.get("src") or "").endswith(".png") for t, attrs in scan.elements if t == "img")
    csp = [
        a for t, a in scan.elements if t == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy"
    ]
    assert [a.get("content") for a in csp] == [CSP]
    assert re.search(r"<title>\s*pwned\s*</title>", page) is None
    for text in shows:
        assert text in scan.text, text
    return scan


def write_evaluate_folder(folder: Path, labelled_jsonl: Path) -> Path:
    """An evaluate folder as the evaluate stage leaves it, every string it records from outside hostile."""
    from pipeline.evals.labelled_data import build_labelled_text, labelled_documents
    from pipeline.evals.results import format_exception, write_json

    labelled_jsonl.write_text(
        "".join(json.dumps({"title": t, "text": "A quiet morning walk by the river.\n\n"}) + "\n" for t in PAYLOADS)
    )
    labelled = build_labelled_text(folder / "labelled", labelled_documents(labelled_jsonl), min_words=2, test_every=2)
    curve = [{"seconds": 1.0 + i, "samples": 512 * (i + 1), "fvu": 0.5 / (i + 1)} for i in range(4)]
    budget = {"mode": "plateau", "seconds": 4.0, "samples": 2048, "steps": 4, "device": ROW_BREAKER}
    saes = [
        {
            "name": DICT_NAME,
            "kind": "dictionary",
            "architecture": "dbksvd",
            "width": 64,
            "k": 4,
            "l0": 4.0,
            "fvu": 0.2,
            "dead_fraction": 0.0,
            "mean_max_abs_cos": 0.3,
            "width_note": IMG,
            "budget": {**budget, "mode": "fit", "updates": 4},
            "heldout_curve": curve,
            "history": [{"iteration": i, "fvu": 0.5 / (i + 1), "seconds": float(i)} for i in range(4)],
        },
        {
            "name": BASE_NAME,
            "kind": "baseline",
            "architecture": SCRIPT,
            "width": 64,
            "k": 4,
            "l0": 4.0,
            "fvu": 0.25,
            "dead_fraction": 0.0,
            "mean_max_abs_cos": 0.3,
            "budget": budget,
            "heldout_curve": curve,
        },
    ]
    for s in saes:
        core = {"sparsity": {"l0": 4.0}, "model_performance_preservation": {"ce_loss_score": 0.9}}
        result = {"eval_result_metrics": core, "sae_cfg_dict": {"architecture": "topk", "d_sae": 64}}
        write_json(folder / "eval_results" / "core" / f"{s['name']}_custom_sae_eval_results.json", result)
    write_json(folder / "saes.json", saes)
    write_json(folder / "skipped.json", [{"what": f"metric:{IMG}", "sae": TICK, "reason": SCRIPT}])
    error = format_exception(RuntimeError(f"judge replied: {TICK}\n{ROW_BREAKER}\n{SCRIPT}"))
    write_json(folder / "failed.json", [{"metric": "autointerp", "error": error}])
    info = {
        "model": {"name": TICK, "hook": IMG, "n_params": 1e6},
        "device": SCRIPT,
        "sizes": {"core": {"note": "```\n" + SCRIPT}},
        "timings_s": {IMG: 1.0},
        "total_eval_s": 1.0,
        "notes": [{"metric": SCRIPT, "low_confidence": True, "note": IMG}],
        "labelled_data": labelled.summary(),
    }
    write_json(folder / "eval_info.json", info)
    return folder


def run_report(root: Path) -> Path:
    """The report stage over the experiment ``TICK`` under ``root``; returns its folder."""
    from stages import report

    cfg = OmegaConf.create({"experiment_name": TICK, "output_root": str(root), "report": {}})
    return report.run(cfg)


def dashboards_summary(folder: Path) -> Path:
    """A finished dashboards folder whose summary carries a hostile skip (what the report's index reads)."""
    from pipeline.report.dashboards import SUMMARY_FILE, page_name
    from pipeline.runs.layout import mark_done

    folder.mkdir(parents=True)
    summary = {"saes": [{"name": BASE_NAME, "page": page_name(BASE_NAME), "drawn": 1, "width": 64}]}
    (folder / SUMMARY_FILE).write_text(json.dumps({**summary, "skipped": [{"what": IMG, "reason": SCRIPT}]}))
    mark_done(folder)
    return folder


def _tables(page: str) -> list[list[int]]:
    """Cells per row of every table of ``page``."""
    return [
        [len(re.findall(r"<t[dh][ >]", tr)) for tr in re.findall(r"<tr>(.*?)</tr>", t, re.S)]
        for t in re.findall(r"<table>(.*?)</table>", page, re.S)
    ]


def test_the_report_shows_hostile_text_as_text(tmp_path):
    """report.md, report.html and index.html: each payload shows as itself, none becomes an element, no table row
    is split, the failure message is one code span; the markdown alone is inert even where raw HTML is on."""
    from pipeline.report.dashboards import page_name
    from pipeline.report.escape import one_line

    exp = tmp_path / TICK
    write_evaluate_folder(exp / "evaluate-a", tmp_path / "labelled.jsonl")
    dashboards = dashboards_summary(exp / "dashboards-a")
    folder = run_report(tmp_path)
    md = (folder / "report.md").read_text()
    error = json.loads((exp / "evaluate-a" / "failed.json").read_text())[0]["error"]
    raw_on = MarkdownIt("commonmark").enable("table").render(md)
    scan = Scan(raw_on)
    assert [t for t, _ in scan.elements if t == "script"] == []
    assert [a for _, attrs in scan.elements for a in attrs if a.startswith("on")] == []
    page = (folder / "report.html").read_text()
    assert_inert(page, shows=(*PAYLOADS, f"experiment {TICK}", one_line(ROW_BREAKER), f"metric:{IMG} / {TICK}"))
    assert f"<code>{html_escape(one_line(error))}</code>" in page
    tables = _tables(page)
    assert len(tables) == 2 and all(len(set(rows)) == 1 for rows in tables), tables  # time to quality, metrics
    assert [len(rows) for rows in tables] == [2, 3]
    assert re.findall(r"^`{3,}json$", md, re.M) == ["````json"]  # the sizes' fence outlasts their backticks
    index = (folder / "index.html").read_text()
    scan = assert_inert(index, shows=(f"experiment {TICK}", f"{IMG}: {SCRIPT}", BASE_NAME))
    hrefs = [unquote(a["href"]) for t, a in scan.elements if t == "a" and a.get("href", "").endswith(".html")]
    assert (folder / hrefs[-1]).resolve() == (dashboards / page_name(BASE_NAME)).resolve()


def html_escape(text: str) -> str:
    """``text`` as markdown-it escapes it in HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _view(text: str = "the", explanation: str | None = None, reason: str = "most used"):
    from pipeline.report.dashboards.features import Context, LatentView

    ctx = Context([(text, 0.0), (text, 2.0), ("\n", 1.0)], focus=1, value=2.0)
    return LatentView(
        3,
        reason,
        5,
        0.1,
        2.0,
        1.0,
        [(0.0, 1.0, 3), (1.0, 2.0, 2)],
        [ctx],
        [(1.0, 2.0, [ctx])],
        promoted=[(text, 0.5)],
        suppressed=[(text, -0.5)],
        explanation=explanation,
        judge_score=0.5,
    )


def _summary(name: str) -> dict:
    from pipeline.report.dashboards import page_name

    return {
        "name": name,
        "page": page_name(name),
        "width": 64,
        "rows": 100,
        "source": "held-out rows",
        "l0": 4.0,
        "dead": 0,
        "drawn": 1,
    }


def test_dashboard_pages_show_hostile_text_as_text(tmp_path):
    """Token strings, a judge's explanation, an SAE's name and a skip reason, through the dashboards' renderer."""
    from pipeline.report.dashboards.render import write_index, write_sae_page

    views = [_view(p, explanation=IMG, reason=SCRIPT) for p in PAYLOADS]
    write_sae_page(tmp_path / "sae.html", BASE_NAME, views, _summary(BASE_NAME), n_top=3)
    assert_inert((tmp_path / "sae.html").read_text(), shows=(*PAYLOADS, f"Judge's explanation: {IMG}"))
    write_index(tmp_path / "index.html", [_summary(BASE_NAME)], [{"what": IMG, "reason": SCRIPT}], note=TICK)
    scan = assert_inert((tmp_path / "index.html").read_text(), shows=(BASE_NAME, f"{IMG}: {SCRIPT}", TICK))
    assert [a["href"] for t, a in scan.elements if t == "a"] == [
        "x%60%20%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.html"
    ]


def test_every_page_keeps_its_css_and_carries_the_csp(tmp_path):
    """The project's CSS reaches every page unescaped (``.cols > div`` is a rule, not ``&gt;``), and each page's
    head opens with the Content-Security-Policy."""
    from pipeline.report.dashboards.render import write_index, write_sae_page
    from pipeline.report.index_page import write_index as write_report_index

    (tmp_path / "report.md").write_text("# A report\n\n| a |\n|---|\n| 1 |\n")
    write_report_index(tmp_path, tmp_path / "report.md", [], "A report")
    write_sae_page(tmp_path / "sae.html", "relu", [_view()], _summary("relu"), n_top=3)
    write_index(tmp_path / "dash.html", [_summary("relu")], [], note="drawn")
    for name in ("index.html", "report.html", "sae.html", "dash.html"):
        page = (tmp_path / name).read_text()
        style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
        assert ".cols > div { min-width: 14em; }" in style and "&gt;" not in style, name
        head = page.split("</head>")[0]
        assert (
            re.match(
                r'<!doctype html>\s*<html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security'
                r'-Policy" content="([^"]+)"><title>',
                head,
            )
            is not None
        ), name
        assert_inert(page)


class HostileTokenizer:
    """Decodes every token id to one of the payloads."""

    def decode(self, ids: list[int]) -> str:
        return PAYLOADS[int(ids[0]) % len(PAYLOADS)]


@pytest.mark.slow
def test_a_hostile_run_opens_inert_in_a_browser(tiny_hooked_model, text_files, tmp_path):
    """A report and real dashboards (the harvest store's rows through two SAEs, token strings, the judge's
    explanations and a skip reason all hostile) open in headless Chromium: on index.html, report.html and every
    dashboard page no script element or event handler exists, each payload shows as text, and the page logs
    nothing (the CSP blocks no image or style it shows)."""
    from pipeline.data.harvest import harvest
    from pipeline.data.store import ActivationStore
    from pipeline.report.dashboards import build_dashboards, page_name
    from pipeline.report.dashboards.config import DashboardsConfig
    from pipeline.runs.layout import mark_done
    from tests.report.test_dashboards import HOOK, ReluSAE
    from tests.utils.browser import open_page

    exp = tmp_path / TICK
    store = ActivationStore(
        harvest(
            tiny_hooked_model,
            text_files["docs"],
            tmp_path / "store",
            hooks=[HOOK],
            n_tokens=800,
            context_length=16,
            batch_size=4,
            heldout_fraction=0.2,
            progress=False,
        )
    )
    model = types.SimpleNamespace(
        tokenizer=HostileTokenizer(), W_U=tiny_hooked_model.W_U, ln_final=tiny_hooked_model.ln_final
    )
    cfg = DashboardsConfig(
        n_most_used=3,
        n_random=1,
        n_top=2,
        n_intervals=2,
        n_per_interval=1,
        window_before=3,
        window_after=1,
        n_logits=3,
        batch_size=256,
        max_rows=4000,
    )
    saes = [(DICT_NAME, ReluSAE(store.d, 64, seed=0)), (BASE_NAME, ReluSAE(store.d, 64, seed=1))]
    judged = {
        name: {0: {"explanation": IMG, "score": 0.5}, 1: {"explanation": SCRIPT, "score": 0.1}} for name, _ in saes
    }
    dashboards = exp / "dashboards-a"
    build_dashboards(
        saes,
        store,
        model,
        cfg,
        dashboards,
        judged=judged,
        skipped=[{"what": IMG, "reason": SCRIPT}],
        progress=False,
    )
    mark_done(dashboards)
    write_evaluate_folder(exp / "evaluate-a", tmp_path / "labelled.jsonl")
    report = run_report(tmp_path)
    pages = {
        report / "index.html": (f"experiment {TICK}", f"{IMG}: {SCRIPT}", BASE_NAME),
        report / "report.html": (*PAYLOADS, f"experiment {TICK}"),
        dashboards / "index.html": (BASE_NAME, f"{IMG}: {SCRIPT}"),
        **{dashboards / page_name(name): (*PAYLOADS, name, f"Judge's explanation: {IMG}") for name, _ in saes},
    }
    for path, shows in pages.items():
        assert_inert(path.read_text(), shows)
        page = open_page(path)
        assert_inert(page.dom, shows)
        assert page.console == [], (path.name, page.console)
    index = (report / "index.html").read_text()
    assert len(list(report.glob("*.png"))) >= 2 and '<img src="fit_curve.png"' in index
    # the console check sees a blocked image: the same index with images forbidden logs the violation
    (report / "blocked.html").write_text(index.replace("img-src 'self' data: file:", "img-src 'none'"))
    assert any("Content Security Policy" in m for m in open_page(report / "blocked.html").console)
