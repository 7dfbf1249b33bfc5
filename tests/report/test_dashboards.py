"""Feature dashboards, pinned to a brute-force recomputation: the model run again on every harvested context (not
the store's token ids), the SAE applied to every kept position, and the counts, top activations, their text and
the latents drawn compared with what the dashboards show."""

from __future__ import annotations

import html
import json
import random
import types

import pytest
import torch

from pipeline.data.harvest import MaskingOptions, harvest
from pipeline.data.store import ActivationStore
from pipeline.data.text import iter_contexts
from pipeline.report.dashboards import build_dashboards
from pipeline.report.dashboards.collect import encode_rows, read_store_text
from pipeline.report.dashboards.config import DashboardsConfig
from pipeline.report.dashboards.features import TokenText, latent_view, logit_weights

HOOK = "blocks.1.hook_resid_post"
L = 16


class ReluSAE(torch.nn.Module):
    """A stand-in SAE with the interface the dashboards use (``encode``, ``W_dec``, ``cfg.d_sae``)."""

    def __init__(self, d: int, width: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d, width, generator=g) / d**0.5)
        self.b = torch.nn.Parameter(torch.full((width,), -1.0))
        self.W_dec = torch.nn.Parameter(torch.randn(width, d, generator=g))
        self.cfg = types.SimpleNamespace(d_sae=width)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b)


@pytest.fixture(scope="module")
def run(tiny_hooked_model, text_files, tmp_path_factory):
    model = tiny_hooked_model
    root = tmp_path_factory.mktemp("dash")
    store = ActivationStore(
        harvest(
            model,
            text_files["docs"],
            root / "store",
            hooks=[HOOK],
            n_tokens=1600,
            context_length=L,
            batch_size=4,
            shard_rows=256,
            heldout_fraction=0.2,
            masking=MaskingOptions(outlier_norm_factor=1.3),
            progress=False,
        )
    )
    sae = ReluSAE(store.d, 64)
    cfg = DashboardsConfig(
        n_most_used=4,
        n_random=3,
        include=[5],
        n_top=5,
        window_before=4,
        window_after=2,
        n_logits=3,
        max_rows=10_000,
        batch_size=100,
    )
    summary = build_dashboards([("relu", sae)], store, model, cfg, root / "out", progress=False)
    # brute force: every context again through the model, the SAE on every position the harvest kept
    contexts = torch.tensor(
        list(iter_contexts(text_files["docs"], model.tokenizer, L, model.tokenizer.bos_token_id))[:100]
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(contexts, names_filter=[HOOK])
        codes = sae.encode(cache[HOOK])  # (100, L, width)
    return dict(
        model=model, store=store, sae=sae, cfg=cfg, summary=summary, out=root / "out", contexts=contexts, codes=codes
    )


def _kept(run):
    """(global ctx, pos) of every stored row, in the order the dashboards read them (held-out, then train), from
    each shard's own token ids (their link to the activations is pinned by tests/data/test_harvest.py)."""
    store, ctx, pos = run["store"], [], []
    for split in ("heldout", "train"):
        for shard in store.shards(split):
            t = store.read_tokens(shard)
            ctx.append(t.contexts[t.positions // L])
            pos.append(t.positions % L)
    return torch.cat(ctx), torch.cat(pos)


def test_counts_top_activations_and_their_text_match_brute_force(run):
    ctx, pos = _kept(run)
    x, _ = read_store_text(run["store"], 10_000)
    with torch.no_grad():
        _, cache = run["model"].run_with_cache(run["contexts"], names_filter=[HOOK])
    torch.testing.assert_close(x.float(), cache[HOOK][ctx, pos], atol=1e-5, rtol=1e-5)
    kept = run["codes"][ctx, pos]  # (n, width): the SAE on every stored row
    s = run["summary"]["saes"][0]
    assert s["rows"] == len(ctx) and s["l0"] == pytest.approx(float((kept > 0).sum(1).float().mean()), rel=1e-5)
    assert s["dead"] == int(((kept > 0).sum(0) == 0).sum())
    counts = (kept > 0).sum(0)
    most = [d["index"] for d in s["latents"] if d["reason"] == "most used"]
    assert sorted(counts[most].tolist(), reverse=True) == sorted(counts.tolist(), reverse=True)[:4]
    assert 5 in [d["index"] for d in s["latents"]]
    assert len([d for d in s["latents"] if d["reason"] == "random"]) == 3
    page = (run["out"] / "relu.html").read_text()
    decode = run["model"].tokenizer.decode
    for d in s["latents"]:
        j = d["index"]
        assert d["count"] == int(counts[j]) and d["max"] == pytest.approx(float(kept[:, j].max()), rel=1e-5)
        assert f'id="latent-{j}"' in page
        # the top context: the window around the brute-force argmax, its tokens decoded from the model's contexts
        top = int(kept[:, j].argmax())
        c, p = int(ctx[top]), int(pos[top])
        window = "".join(decode([t]) for t in run["contexts"][c, max(p - 4, 0) : p + 3].tolist())
        card = page.split(f'id="latent-{j}"')[1].split('class="card latent"')[0]
        first = card.split('<div class="ctx">')[1].split("</div>")[0]
        shown = "".join(part.split(">", 1)[1] for part in first.split("</span>")[:-1] if 'class="tok' in part)
        assert html.unescape(shown).replace("\u21b5", "\n") == window

    # the top contexts: largest first, windows never overlapping one another
    x, text = read_store_text(run["store"], 10_000)
    codes = encode_rows(run["sae"], x, batch_size=100, device="cpu", progress=False)
    for d in s["latents"]:
        view = latent_view(
            d["index"], d["reason"], codes, text, TokenText(run["model"].tokenizer), run["cfg"], random.Random(0)
        )
        values = [c.value for c in view.top]
        assert values == sorted(values, reverse=True) and values[0] == pytest.approx(d["max"])
        where = [c.where for c in view.top]
        assert all(a[0] != b[0] or abs(a[1] - b[1]) > 6 for i, a in enumerate(where) for b in where[i + 1 :])


def test_logits_are_the_decoder_direction_through_the_unembedding(run):
    model, sae = run["model"], run["sae"]
    W = logit_weights(sae.W_dec.detach()[:2], model)
    expected = (
        (sae.W_dec.detach()[:2] * model.ln_final.w.detach()) @ model.W_U.detach()
        if hasattr(model.ln_final, "w")
        else sae.W_dec.detach()[:2] @ model.W_U.detach()
    )
    torch.testing.assert_close(W, expected)


def test_summary_and_index_are_written(run):
    summary = json.loads((run["out"] / "dashboards.json").read_text())
    assert summary["saes"][0]["page"] == "relu.html" and summary["rows"] == run["summary"]["rows"]
    assert 'href="relu.html"' in (run["out"] / "index.html").read_text()


def test_a_store_without_token_ids_is_refused_with_the_fix(tmp_path):
    import numpy as np

    from pipeline.data.store_writer import import_array

    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
    store = ActivationStore(import_array(tmp_path / "a.npy", tmp_path / "s", shard_rows=100))
    with pytest.raises(ValueError, match="keeps no token ids.*re-harvest"):
        read_store_text(store, 100)
