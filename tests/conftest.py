"""Shared fixtures: a tiny local tokenizer, tiny transformer-lens and HF models, small text files.

Nothing here touches the network: the tokenizer is trained on generated sentences, models are randomly
initialised (they are stand-ins for the plumbing; the real-model check is ``test_smollm2_real_model``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

TINY_N_CTX = 64
TINY_D_MODEL = 32
TINY_LAYERS = 2

_WORDS = ("the a one every some old young quiet bright small large river house garden letter morning evening "
          "walked wrote read found kept gave sister brother friend mother father visitor neighbour village "
          "town road window door table chair book candle carriage ball dance dinner rain sun cold warm "
          "slowly kindly often never always because although while after before and but or with from into "
          "under over near far happy sad proud gentle clever honest").split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` generated English-like sentences (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
    return out


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` documents of a few paragraphs each."""
    rng = random.Random(seed)
    sents = make_sentences(n_docs * 12, seed)
    docs = []
    for i in range(n_docs):
        chunk = sents[i * 12:(i + 1) * 12]
        cut = rng.randint(3, 9)
        docs.append(" ".join(chunk[:cut]) + "\n\n" + " ".join(chunk[cut:]))
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 320, <bos>/<eos>/<pad>) trained locally, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(make_sentences(2000, seed=1), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_hooked_model(tiny_tokenizer):
    """A randomly initialised 2-layer HookedTransformer (d=32, n_ctx=64) with the tiny tokenizer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=TINY_LAYERS, d_model=TINY_D_MODEL, n_ctx=TINY_N_CTX, d_head=8,
                                  n_heads=4, d_mlp=64, d_vocab=len(tiny_tokenizer), act_fn="gelu",
                                  normalization_type="LN", seed=0, model_name="tiny-test")
    return HookedTransformer(cfg, tokenizer=tiny_tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A randomly initialised tiny Llama causal LM + the tiny tokenizer, saved as a local HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=TINY_D_MODEL, intermediate_size=64,
                      num_hidden_layers=TINY_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=TINY_N_CTX, rope_theta=5000.0, tie_word_embeddings=False,
                      bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                      pad_token_id=tiny_tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("tiny_hf")
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same 40 generated documents as txt (one file per doc), jsonl and parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(40, seed=2)
    root = tmp_path_factory.mktemp("text")
    (root / "txt").mkdir()
    for i, doc in enumerate(docs):
        (root / "txt" / f"doc{i:03d}.txt").write_text(doc)
    with open(root / "docs.jsonl", "w") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")
    pq.write_table(pa.table({"text": docs}), root / "docs.parquet")
    (root / "empty.jsonl").write_text("")
    return {"txt_glob": root / "txt" / "*.txt", "jsonl": root / "docs.jsonl", "parquet": root / "docs.parquet",
            "empty": root / "empty.jsonl", "docs": docs}
