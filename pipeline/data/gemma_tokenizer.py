"""A correct Gemma-3 tokenizer from a GGUF file, for transformers 4.x.

transformers 4.57 builds a Unigram tokenizer from Gemma GGUF metadata, which is wrong (Gemma is SentencePiece
BPE; the GGUF scores are -rank), e.g. ``" capital"`` -> ``" c","ap","it","al"`` (huggingface/transformers#41494,
fixed in 5.x). This module rebuilds the BPE tokenizer from the GGUF vocab, scores and token types
(``docs/offline-models-and-text.md``).
"""

from __future__ import annotations

from pathlib import Path

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
"""GGUF ``tokenizer.ggml.token_type`` codes used here."""


def build_gemma3_tokenizer(gguf_path: str | Path):
    """Return a ``PreTrainedTokenizerFast`` (BPE, byte fallback, ``<bos>`` prepended) built from a Gemma GGUF."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    fields = GGUFReader(str(gguf_path)).fields
    tok_f, score_f, type_f = (
        fields[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    )
    pieces = [bytes(tok_f.parts[i]).decode("utf-8") for i in tok_f.data]
    scores = [float(score_f.parts[i][0]) for i in score_f.data]
    types = [int(type_f.parts[i][0]) for i in type_f.data]
    # whitespace-only normal pieces are stored with spaces; the BPE model works on "▁"
    pieces = ["▁" * len(p) if ty != USER_DEFINED and " " in p and not p.strip() else p for p, ty in zip(pieces, types)]
    vocab: dict[str, int] = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    merges = generate_merges(vocab, {p: s for p, s, ty in zip(pieces, scores, types) if ty == NORMAL})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_tokens(
        [AddedToken(p, normalized=False, special=False) for p, ty in zip(pieces, types) if ty == USER_DEFINED]
    )
    tk.add_special_tokens(
        [AddedToken(p, normalized=False, special=True) for p, ty in zip(pieces, types) if ty == CONTROL]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
