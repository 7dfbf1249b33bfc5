"""The shapes of the paper presets' models, from their published configs, without their weights.

:data:`ARCHITECTURES` holds, per model name (``model.name``), what sizing a run needs before anything is
downloaded: the residual width, the depth, the vocabulary, the attention and MLP shapes, and from them the
parameter count of the checkpoint (:meth:`Architecture.hf_params`) and of the ``HookedTransformer`` the harvest
and SAEBench hold (:meth:`Architecture.tl_params`: transformer-lens keeps an untied unembedding and zero biases
the checkpoint does not have). :mod:`pipeline.runs.plan` sizes the presets' memory from them.

Sources, each readable offline (``tests/data/test_model_shapes.py`` checks every figure against them):

* **gemma-2-2b**: transformers' ``Gemma2Config()`` defaults (transformers 4.57: "defaults will yield a similar
  configuration to that of the Gemma2-7B" in its docstring, but the values are gemma-2-2b's: hidden 2304, 26
  layers, vocab 256000, 8 heads, 4 key/value heads, head_dim 256, intermediate 9216), equal to transformer-lens's
  hard-coded official config for ``google/gemma-2-2b`` (``loading_from_pretrained.py``), which needs no hub;
  2,614,341,888 parameters with tied embeddings (a meta-device ``Gemma2ForCausalLM`` counts the same).
* **pythia-160m-deduped**: EleutherAI's training config ``models/160M/pythia-160m-deduped.yml`` (github.com/
  EleutherAI/pythia: 12 layers, hidden 768, 12 heads, rotary_pct 0.25, untied unembedding), the 4 × hidden MLP
  of GPT-NeoX, and the vocabulary of its Hugging Face ``config.json`` (50,304: the 50,277-token GPT-NeoX-20B
  tokenizer padded to a multiple of 128); 162,322,944 parameters, 85,056,000 of them outside the embeddings,
  the Pythia paper's table (Biderman et al. 2023, Table 1). SAEBench's own table (``sae_bench.custom_saes.
  run_all_evals_dictionary_learning_saes``, installed) gives d_model 768 for it. transformer-lens has no
  offline config for it (it reads the hub's ``config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """One decoder-only transformer's shapes (the fields of its Hugging Face ``config.json``)."""

    name: str
    """The model's transformer-lens / ``model.name`` name."""
    hf_class: str
    """The transformers class its ``config.json`` declares (``architectures[0]``)."""
    d_model: int
    """Residual width (``hidden_size``): the width of every ``blocks.<L>.hook_resid_post`` row."""
    n_layers: int
    """Blocks (``num_hidden_layers``)."""
    d_vocab: int
    """Rows of the embedding and columns of the logits (``vocab_size``, padded)."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than ``n_heads``)."""
    d_head: int
    """Width of one head."""
    d_mlp: int
    """MLP hidden width (``intermediate_size``)."""
    gated_mlp: bool
    """Gated MLP (gate, up and down projections) rather than in and out."""
    tied_embeddings: bool
    """The checkpoint's unembedding is its embedding (transformer-lens still holds a separate ``W_U``)."""
    norms_per_layer: int
    """Norm layers per block (Gemma-2: before and after attention and MLP, 4; GPT-NeoX: 2)."""
    norm_bias: bool
    """LayerNorm (weight and bias) rather than RMSNorm (weight only)."""
    linear_bias: bool
    """The attention and MLP projections have biases in the checkpoint."""
    rotary_dim: int
    """Rotary dimensions per head (transformer-lens keeps sin and cos tables of ``n_ctx × rotary_dim``)."""
    n_ctx: int
    """Longest context (``max_position_embeddings``): transformer-lens's window unless ``model.n_ctx`` says."""
    source: str
    """Where the figures come from (module docstring)."""

    def _block_weights(self) -> int:
        """Attention and MLP weight matrices of one block."""
        q_o = 2 * self.d_model * self.n_heads * self.d_head
        k_v = 2 * self.d_model * self.n_kv_heads * self.d_head
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp
        return q_o + k_v + mlp

    def _block_biases(self) -> int:
        """Attention (q, k, v, out) and MLP (in, out) biases of one block."""
        return (self.n_heads + 2 * self.n_kv_heads) * self.d_head + self.d_model + self.d_mlp + self.d_model

    def _norm(self) -> int:
        return self.d_model * (2 if self.norm_bias else 1)

    def hf_params(self) -> int:
        """Parameters of the checkpoint: embedding, unembedding unless tied, every block, the final norm."""
        per_block = self._block_weights() + self.norms_per_layer * self._norm()
        per_block += self._block_biases() if self.linear_bias else 0
        unembed = 0 if self.tied_embeddings else self.d_vocab * self.d_model
        return self.d_vocab * self.d_model + unembed + self.n_layers * per_block + self._norm()

    def tl_params(self) -> int:
        """Parameters of the ``HookedTransformer`` (what the harvest and SAEBench put on the GPU): every block with
        biases (zeros where the checkpoint has none), ``W_E`` and a separate ``W_U`` (tied or not) and ``b_U``."""
        per_block = self._block_weights() + self._block_biases() + self.norms_per_layer * self._norm()
        return 2 * self.d_vocab * self.d_model + self.d_vocab + self.n_layers * per_block + self._norm()

    def tl_buffer_bytes(self, n_ctx: int, dtype_bytes: int) -> int:
        """Bytes of the ``HookedTransformer``'s buffers at context window ``n_ctx``: per block a causal mask
        (``n_ctx²`` bools), the rotary sin and cos tables (``2 × n_ctx × rotary_dim`` in the model dtype) and one
        fp32 scalar."""
        return self.n_layers * (n_ctx * n_ctx + 2 * n_ctx * self.rotary_dim * dtype_bytes + 4)


GEMMA_2_2B = Architecture(
    name="gemma-2-2b",
    hf_class="Gemma2ForCausalLM",
    d_model=2304,
    n_layers=26,
    d_vocab=256000,
    n_heads=8,
    n_kv_heads=4,
    d_head=256,
    d_mlp=9216,
    gated_mlp=True,
    tied_embeddings=True,
    norms_per_layer=4,
    norm_bias=False,
    linear_bias=False,
    rotary_dim=256,
    n_ctx=8192,
    source="transformers Gemma2Config() defaults = transformer-lens's official google/gemma-2-2b config",
)

PYTHIA_160M_DEDUPED = Architecture(
    name="pythia-160m-deduped",
    hf_class="GPTNeoXForCausalLM",
    d_model=768,
    n_layers=12,
    d_vocab=50304,
    n_heads=12,
    n_kv_heads=12,
    d_head=64,
    d_mlp=3072,
    gated_mlp=False,
    tied_embeddings=False,
    norms_per_layer=2,
    norm_bias=True,
    linear_bias=True,
    rotary_dim=16,
    n_ctx=2048,
    source="EleutherAI/pythia models/160M/pythia-160m-deduped.yml; vocab of its HF config.json (50277 padded to 128)",
)

#: Architectures by ``model.name``.
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (GEMMA_2_2B, PYTHIA_160M_DEDUPED)}


def architecture(name: str) -> Architecture:
    """The shapes of ``model.name`` = ``name`` (``ValueError`` naming the known ones)."""
    if name not in ARCHITECTURES:
        raise ValueError(
            f"no published shapes for model {name!r} here; known: {', '.join(ARCHITECTURES)} "
            "(pipeline/data/architectures.py: ARCHITECTURES)"
        )
    return ARCHITECTURES[name]


__all__ = ["ARCHITECTURES", "Architecture", "GEMMA_2_2B", "PYTHIA_160M_DEDUPED", "architecture"]
