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

#: The repository root and its Hydra config folder.
REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

#: The warnings SAEBench's runs on the tiny test model and a few dozen rows raise, ignored by name in the modules
#: that run them (every other warning still shows): its probes see one class or no positives, sklearn 1.8
#: deprecates the ``penalty`` argument SAEBench passes, and sae-lens's activation store notes the tiny dataset.
SAEBENCH_TINY_RUN_WARNINGS = [
    pytest.mark.filterwarnings("ignore:Only one class is present in y_true:sklearn.exceptions.UndefinedMetricWarning"),
    pytest.mark.filterwarnings(
        "ignore:.* is ill-defined and being set to 0.0:sklearn.exceptions.UndefinedMetricWarning"
    ),
    pytest.mark.filterwarnings("ignore:'penalty' was deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The training dataset contains fewer samples:UserWarning"),
    pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning"),
]

TINY_N_CTX = 64
TINY_D_MODEL = 32
TINY_LAYERS = 2

_WORDS = (
    "the a one every some old young quiet bright small large river house garden letter morning evening "
    "walked wrote read found kept gave sister brother friend mother father visitor neighbour village "
    "town road window door table chair book candle carriage ball dance dinner rain sun cold warm "
    "slowly kindly often never always because although while after before and but or with from into "
    "under over near far happy sad proud gentle clever honest"
).split()


def compose_config(*overrides: str) -> Any:
    """The real config of ``conf/`` composed with ``overrides`` (as on the command line), schema checks included."""
    from hydra import compose, initialize_config_dir

    from pipeline.runs.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


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
        chunk = sents[i * 12 : (i + 1) * 12]
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
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
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

    cfg = HookedTransformerConfig(
        n_layers=TINY_LAYERS,
        d_model=TINY_D_MODEL,
        n_ctx=TINY_N_CTX,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=len(tiny_tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        model_name="tiny-test",
    )
    return HookedTransformer(cfg, tokenizer=tiny_tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A randomly initialised tiny Llama causal LM + the tiny tokenizer, saved as a local HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=TINY_D_MODEL,
        intermediate_size=64,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_N_CTX,
        rope_theta=5000.0,
        tie_word_embeddings=False,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_hf")
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def toy_paper_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    """Paper preset (``gemma2b_paper``, ``pythia160m_paper``) -> a random-weight toy of its model's architecture
    (Gemma-2, GPT-NeoX) + the tiny tokenizer, saved as a local HF directory (:mod:`tests.toy_models`). The folder
    names hold ``gemma`` / ``pythia``, as a downloaded copy's would."""
    from tests.toy_models import PAPER_PRESETS, save_toy_model

    names = {"gemma2b_paper": "toy_gemma2", "pythia160m_paper": "toy_pythia_neox"}
    return {p: save_toy_model(p, tiny_tokenizer, tmp_path_factory.mktemp(names[p])) for p in PAPER_PRESETS}


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
    return {
        "txt_glob": root / "txt" / "*.txt",
        "jsonl": root / "docs.jsonl",
        "parquet": root / "docs.parquet",
        "empty": root / "empty.jsonl",
        "docs": docs,
    }


# ======================================================================================================
# Evaluate / report fixtures (owned by the evaluate-stage work): a tiny harvested store, a dictionary and a
# TopK SAE fitted on it, labelled passages shaped like SAEBench's two-attribute data, and the eval config.
# The model is the randomly initialised tiny Llama above, so metric values are meaningless; the tests check
# that SAEBench's code runs end to end and what the stage records.
# ======================================================================================================
EVAL_CONTEXT = 32


def make_labelled_documents(n_titles: int = 3, n_paragraphs: int = 96, seed: int = 5) -> list[dict[str, str]]:
    """``n_titles`` generated "novels"; every other paragraph holds dialogue (a quotation)."""
    rng = random.Random(seed)
    out = []
    for t in range(n_titles):
        sents = make_sentences(n_paragraphs * 3, seed=seed + t)
        paras = []
        for i in range(n_paragraphs):
            body = " ".join(sents[3 * i : 3 * i + 3])
            if i % 2:
                body = f'"{body}" said the {rng.choice(["sister", "friend", "visitor"])}.'
            paras.append(body)
        out.append({"title": f"book{t}", "text": "\n\n".join(paras)})
    return out


@pytest.fixture(scope="session")
def eval_inputs(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path, text_files) -> dict[str, Any]:
    """Store + dictionary + a sae-lens TopK baseline (``baselines/topk``) + labelled jsonl for the
    evaluate/report tests."""
    from pipeline.baselines import BaselineSpec, Budget, save_baseline, train_baseline
    from pipeline.core.dictionary import CoderSettings, Dictionary
    from pipeline.data.harvest import harvest
    from pipeline.data.models import load_model

    root = tmp_path_factory.mktemp("eval_inputs")
    model = load_model("tiny-local", path=tiny_hf_dir)
    docs = make_documents(120, seed=3)
    store = harvest(
        model,
        docs,
        root / "harvest" / "store",
        hooks=["blocks.1.hook_resid_post"],
        n_tokens=3200,
        context_length=EVAL_CONTEXT,
        batch_size=8,
        heldout_fraction=0.1,
        progress=False,
    )
    from pipeline.data.store import ActivationStore

    Y = ActivationStore(store).load_all()
    g = torch.Generator().manual_seed(0)
    atoms = Y[torch.randperm(Y.shape[0], generator=g)[:64]]
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    d = Dictionary(
        atoms,
        CoderSettings(k=4),
        history=[
            {"iteration": i, "fvu": 1.0 / (i + 1), "l0": 4.0, "dead_fraction": 0.0, "seconds": float(i)}
            for i in range(3)
        ],
    )
    fit = root / "fit"
    d.save(fit / "dictionary")
    trained = train_baseline(
        Y, Y.shape[1], 64, 4, BaselineSpec("topk", batch_size=256, device="cpu"), Budget("steps", steps=5)
    )
    baselines = root / "baselines"
    save_baseline(
        trained,
        baselines / "topk",
        {"model_name": "tiny-local", "hook_name": "blocks.1.hook_resid_post", "context_size": EVAL_CONTEXT},
    )
    labelled = root / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in make_labelled_documents()))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return {
        "root": root,
        "store": store,
        "fit": fit,
        "baselines": baselines,
        "labelled": labelled,
        "corpus": corpus,
        "model": model,
        "tiny_hf_dir": tiny_hf_dir,
    }


def tiny_eval_config(inputs: dict[str, Any], out: Path, metrics: list[str]) -> Any:
    """The config of a tiny evaluate run: a complete ``eval`` node (every field of
    :class:`pipeline.evals.config.EvalConfig`), SAEBench sizes shrunk to seconds."""
    from omegaconf import OmegaConf

    probing = {"dataset_names": ["austen_labelled"], "context_length": EVAL_CONTEXT, "sae_batch_size": 16}
    scr_tpp = {**probing, "train_set_size": 40, "test_set_size": 20, "probe_epochs": 2, "n_values": [2, 5]}
    return OmegaConf.create(
        {
            "output_root": str(out),
            "experiment_name": "tiny",
            "model": {
                "name": "tiny-local",
                "path": str(inputs["tiny_hf_dir"]),
                "device": "cpu",
                "dtype": "float32",
                "n_ctx": None,
                "layer": 1,
            },
            "data": {"kind": "files", "paths": [str(inputs["corpus"])]},
            "harvest": {"n_tokens": 3200, "context_length": EVAL_CONTEXT, "heldout_fraction": 0.1, "progress": False},
            "baseline": {"topk": {"architecture": "topk"}},
            "eval": {
                "metrics": metrics,
                "saes": ["dictionary", "baselines"],
                "hub_baselines": [],
                "device": None,
                "llm_batch_size": 8,
                "force_rerun": False,
                "local_datasets": {},
                "encode_cache_mb": 256,
                # each run's own shared cache: the session's store is shared by many tests, and entries another
                # test left would make this run's forward counts depend on the test order
                "cache": {"enabled": True, "root": str(out / "eval_cache"), "max_gb": 20.0},
                "labelled": {"jsonl": str(inputs["labelled"]), "min_words": 5, "test_every": 3},
                "core": {
                    "dataset": None,
                    "context_size": EVAL_CONTEXT,
                    "batch_size_prompts": 4,
                    "n_eval_reconstruction_batches": 1,
                    "n_eval_sparsity_variance_batches": 2,
                },
                "absorption": {
                    "vocab_size": 120,
                    "min_words_per_letter": 2,
                    "low_confidence_below_params": 2.0e9,
                    "config": {
                        "min_feats_for_eval": 1,
                        "min_GT_probe_f1": 0.0,
                        "max_k_value": 2,
                        "k_sparse_probe_num_epochs": 2,
                        "llm_batch_size": 16,
                    },
                },
                "sparse_probing": {
                    "config": {**probing, "probe_train_set_size": 40, "probe_test_set_size": 20, "k_values": [1, 2]}
                },
                "scr": {"config": {**scr_tpp, "column1_vals_lookup": {"austen_labelled": [["book0", "book1"]]}}},
                "tpp": {"config": scr_tpp},
                "autointerp": {
                    "api_key_env": None,  # OpenAI: $OPENAI_API_KEY; a base_url: no key
                    "config": {
                        "n_latents": 3,
                        "total_tokens": 4000,
                        "llm_context_size": EVAL_CONTEXT,
                        "n_top_ex_for_generation": 2,
                        "n_iw_sampled_ex_for_generation": 1,
                        "n_top_ex_for_scoring": 1,
                        "n_random_ex_for_scoring": 2,
                        "n_iw_sampled_ex_for_scoring": 1,
                        "buffer": 2,
                    },
                },
                "ravel": {"config": {}},
                "unlearning": {"config": {}},
            },
        }
    )


def run_tiny_evaluate(inputs: dict[str, Any], cfg: Any, out: Path) -> Path:
    """The evaluate stage on the tiny inputs (``eval_inputs``) with ``cfg`` (:func:`tiny_eval_config`), into
    ``out / "evaluate"``; returns its folder."""
    from stages import evaluate

    return evaluate.run(
        cfg,
        run_dir=out / "evaluate",
        fit_dir=inputs["fit"],
        baselines_dir=inputs["baselines"],
        store_dir=inputs["store"],
        model=inputs["model"],
    )
