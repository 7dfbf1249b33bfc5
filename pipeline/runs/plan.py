"""A run's planned memory, from its composed config and its model's published shapes, before renting a GPU.

    python -m stages.plan experiment=gemma2b_paper        # prints the plan; loads and runs nothing

:func:`plan_run` sizes each stage of a config at its real sizes (the model's shapes from
:mod:`pipeline.data.architectures`, nothing downloaded): the harvest store on disk (rows, bytes per token and per
row), and per GPU the largest tensors each stage holds at once, for one process and for ``ranks`` torchrun ranks
(:mod:`pipeline.runs.distributed`: the harvest and the fit run on every rank, the fit coding ``1 / ranks`` of
every sample batch; the baselines and the evaluation run on rank 0 alone).

**An estimate of the largest live tensors**, each a :class:`Term` naming its shape, not a measurement. Left out
(:data:`LEFT_OUT`): the CUDA context and the allocator's slack, kernels' transient copies, the rare dense
eigensolves of the atom update, the SAEBench metrics other than core, sae-lens internals beyond parameters,
moments and one step's activations. ``benchmarks/bench_gpu_check.py`` measures the peaks these terms predict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.baselines.compare import comparison_width
from pipeline.core.dictionary import code_width
from pipeline.core.learner_config import LearnerConfig
from pipeline.core.matryoshka import matryoshka_groups
from pipeline.data.architectures import Architecture, architecture
from pipeline.data.config import parse_harvest_config
from pipeline.data.loader import IN_MEMORY_SHARE
from pipeline.data.store import heldout_mask
from pipeline.evals.config import EvalConfig
from pipeline.runs.config import baseline_specs, section

#: Bytes per element of each dtype name the config uses.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Rows the MP / OMP coder codes at once on a GPU at most (``pipeline.core.coders.auto_chunk_size``'s cap; it
#: also keeps the chunk within a third of free memory, so a smaller GPU codes in more, smaller chunks).
CODER_CHUNK_CAP = 1 << 17
#: Largest gathered block of the atom update on a GPU, in entries (``pipeline.core.atom_update._GATHER_BUDGET``).
UPDATE_BLOCK_ENTRIES = 1 << 28
#: Logits-sized tensors alive at once in SAEBench core's ``get_recons_loss``: the clean, spliced and ablated
#: logits, and inside its ``kl`` both softmaxes, both logs, their difference and the product.
CORE_LIVE_LOGITS = 9
#: Memory a GPU of each kind offers (bytes), for the fits-or-not columns.
GPUS = {"H100 80GB": 80 * 10**9, "H200 141GB": 141 * 10**9}
#: What the plan leaves out.
LEFT_OUT = (
    "the CUDA context and the caching allocator's slack (about 0.5-1 GB per process) and cuBLAS workspaces",
    "transient copies inside single operations (casts, masks, the decode of a batch's codes)",
    "the atom update's Lanczos bases and its rare dense fp64 eigensolves (a block left to torch.linalg.eigh holds "
    "atoms x d x d doubles)",
    "SAEBench metrics other than core: sparse probing, SCR and TPP keep their datasets' activations, RAVEL loads "
    "the Hugging Face model a second time, unlearning loads an instruction-tuned Gemma",
    "sae-lens trainer internals beyond parameters, gradients, Adam moments and one step's activations",
    "the hub checkpoint in the Hugging Face cache (disk) and the shard buffered in host memory before it is written",
)


@dataclass(frozen=True)
class Term:
    """One tensor (or a group of same-shaped ones) a stage holds."""

    name: str
    bytes: int
    shape: str
    """How the bytes are counted, e.g. ``32 × 128 × 2304 × 2 B``."""


@dataclass(frozen=True)
class StagePlan:
    """The largest tensors one GPU holds at once in one stage."""

    stage: str
    ranks: int
    """Processes of the launch (1, or the torchrun ranks)."""
    where: str
    """Which ranks hold this: ``each rank`` or ``rank 0``."""
    terms: tuple[Term, ...]
    host_terms: tuple[Term, ...] = ()
    """Host-memory terms per process (the model's conversion on the CPU)."""

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def fits(self) -> dict[str, bool]:
        """Whether :attr:`total` fits in each of :data:`GPUS`."""
        return {gpu: self.total <= size for gpu, size in GPUS.items()}


@dataclass(frozen=True)
class StorePlan:
    """The activation store a harvest writes (:mod:`pipeline.data.store`): one safetensors file per hook, split and
    shard, holding the rows (``rows × d`` in the store dtype), each row's position (int64) and the token ids of its
    contexts (``contexts × context_length`` int32, plus each context's int64 index)."""

    contexts: int
    heldout_contexts: int
    train_rows: int
    """At most: every context's BOS is left out; document separators and other special tokens inside contexts
    are left out too, so a real store holds fewer."""
    heldout_rows: int
    bytes_per_token: int
    """Activation bytes of one token position, every hook: ``hooks × d × store dtype``."""
    bytes_per_row: float
    """Disk bytes of one token position (every hook) with the positions and its share of the token ids."""
    disk_bytes: int
    fp32_bytes: int
    """One hook's training rows as the fit holds them in memory: ``train_rows × d × 4``."""
    in_memory_needs_free: int
    """The fit and the baselines hold the store in GPU memory only when it is at most
    ``pipeline.data.loader.IN_MEMORY_SHARE`` of the free memory, else they stream it: this much free."""

    def in_memory_on(self) -> dict[str, bool]:
        return {gpu: self.in_memory_needs_free <= size for gpu, size in GPUS.items()}


@dataclass(frozen=True)
class Plan:
    """A run's store and per-stage GPU memory, for 1 and more ranks."""

    experiment: str
    model: Architecture
    hooks: tuple[str, ...]
    model_dtype: str
    store_dtype: str
    store: StorePlan
    stages: tuple[StagePlan, ...]
    left_out: tuple[str, ...] = field(default=LEFT_OUT)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: the model's shapes and parameter counts, the store, each stage's terms and total."""
        out = asdict(self)
        out["model"] |= {"hf_params": self.model.hf_params(), "tl_params": self.model.tl_params()}
        out["store"] |= {"in_memory_on": self.store.in_memory_on()}
        out["stages"] = {}
        for s in self.stages:
            out["stages"].setdefault(str(s.ranks), {})[s.stage] = {
                **asdict(s),
                "total_bytes": s.total,
                "fits": s.fits(),
            }
        return out


def plan_run(cfg: Any, ranks: tuple[int, ...] = (1, 8)) -> Plan:
    """The :class:`Plan` of the composed config ``cfg`` (a ``DictConfig`` or plain dict) on 1 and ``ranks`` GPUs.
    Its model must be one of :data:`pipeline.data.architectures.ARCHITECTURES` (``model.name``)."""
    model_cfg, _, harvest = parse_harvest_config(cfg)
    arch = architecture(model_cfg.name)
    learner: LearnerConfig = section(cfg, "dictionary")
    evals: EvalConfig = section(cfg, "eval")
    hooks = tuple(harvest.hook_list(model_cfg.layer))
    mb, sb = DTYPE_BYTES[model_cfg.dtype], DTYPE_BYTES[harvest.dtype]
    store = store_plan(
        arch.d_model, harvest.n_tokens, harvest.context_length, harvest.heldout_fraction, sb, n_hooks=len(hooks)
    )
    n_ctx = model_cfg.n_ctx or arch.n_ctx
    model = model_terms(arch, mb, n_ctx)
    baselines = [spec.batch_size for spec in baseline_specs(cfg).values()]
    width = comparison_width(section(cfg, "compare"), learner.n_atoms, signed=not learner.coder.nonnegative)
    d = arch.d_model  # the fit and the baselines read one hook's rows
    stages: list[StagePlan] = []
    for world in ranks:
        activations = harvest_activations(arch, harvest.batch_size, harvest.context_length, mb, len(hooks))
        stages.append(StagePlan("harvest", world, "each rank", (*model, activations), harvest_host(arch, mb)))
        for held in (False, True):
            stages.append(
                StagePlan(f"fit {_held(held)}", world, "each rank", fit_terms(d, learner, store, world, held))
            )
        for held in (False, True) if baselines else ():
            terms = baseline_terms(d, width, max(baselines), store, held)
            stages.append(StagePlan(f"baselines {_held(held)}", world, "rank 0", terms))
        stages.append(StagePlan("evaluate", world, "rank 0", (*model, *core_terms(arch, evals, learner, mb))))
    return Plan(str(cfg["experiment_name"]), arch, hooks, model_cfg.dtype, harvest.dtype, store, tuple(stages))


def _held(in_memory: bool) -> str:
    return "in memory" if in_memory else "streamed"


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def store_plan(
    d: int, n_tokens: int, context_length: int, heldout_fraction: float, store_bytes: int, n_hooks: int = 1
) -> StorePlan:
    """The store of ``ceil(n_tokens / context_length)`` contexts, each context's first token (BOS) left out: per
    hook, rows of width ``d`` in ``store_bytes`` per element with their positions and the contexts' token ids
    (each hook's files hold their own). The fit reads one hook: ``fp32_bytes`` is one hook's rows."""
    contexts = math.ceil(n_tokens / context_length)
    heldout = int(heldout_mask(np.arange(contexts), heldout_fraction).sum())
    rows_per_context = context_length - 1
    train_rows, heldout_rows = (contexts - heldout) * rows_per_context, heldout * rows_per_context
    rows = train_rows + heldout_rows
    per_row = d * store_bytes + 8  # the row and its int64 position
    per_context = 4 * context_length + 8  # its int32 token ids and its int64 index
    disk = n_hooks * (rows * per_row + contexts * per_context)
    fp32 = train_rows * d * 4
    return StorePlan(
        contexts=contexts,
        heldout_contexts=heldout,
        train_rows=train_rows,
        heldout_rows=heldout_rows,
        bytes_per_token=n_hooks * d * store_bytes,
        bytes_per_row=disk / rows,
        disk_bytes=disk,
        fp32_bytes=fp32,
        in_memory_needs_free=math.ceil(fp32 / IN_MEMORY_SHARE),
    )


def model_terms(arch: Architecture, dtype_bytes: int, n_ctx: int) -> tuple[Term, ...]:
    """The ``HookedTransformer`` on the GPU: its parameters and its buffers (masks, rotary tables)."""
    p = arch.tl_params()
    return (
        Term("model weights (HookedTransformer)", p * dtype_bytes, f"{p:,} params × {dtype_bytes} B"),
        Term(
            "model buffers",
            arch.tl_buffer_bytes(n_ctx, dtype_bytes),
            f"{arch.n_layers} × (mask + rotary), n_ctx {n_ctx}",
        ),
    )


def harvest_activations(arch: Architecture, batch: int, length: int, dtype_bytes: int, n_hooks: int = 1) -> Term:
    """One block's live activations for a ``batch × length`` forward under ``inference_mode`` (the harvest stops
    after the hooked block, so there are no logits): the residual and its normed copy, q, k and v (k and v
    repeated to every query head) and the heads' output, the MLP's pre-activations (gated: gate, up and
    their product), the attention scores and pattern in fp32; plus the hooked rows and their store-dtype copy."""
    b, L, d = batch, length, arch.d_model
    mlp = (3 if arch.gated_mlp else 2) * b * L * arch.d_mlp
    elements = 2 * b * L * d + 4 * b * L * arch.n_heads * arch.d_head + mlp + 2 * n_hooks * b * L * d
    total = elements * dtype_bytes + 2 * b * arch.n_heads * L * L * 4
    return Term("one block's activations + hooked rows", total, f"batch {b} × {L} tokens, d {d}, d_mlp {arch.d_mlp}")


def harvest_host(arch: Architecture, dtype_bytes: int) -> tuple[Term, ...]:
    """Host memory per process while loading: the checkpoint as a transformers model in fp32 (``model.path``
    loads it so; the hub route in the model dtype) and the converted state dict in the model dtype."""
    hf, tl = arch.hf_params(), arch.tl_params()
    return (
        Term("checkpoint on the host (fp32)", hf * 4, f"{hf:,} params × 4 B"),
        Term("converted state dict", tl * dtype_bytes, f"{tl:,} params × {dtype_bytes} B"),
    )


def coder_row_bytes(n_atoms: int, k: int, method: str, candidates: int | None) -> int:
    """Bytes per coded row of the MP / OMP working set (``pipeline.core.coders.auto_chunk_size``): its
    correlation row (K, or the candidates) three times in fp32, int64 indices of it, one gathered Gram row, the
    initial correlations, OMP's k × k Cholesky factor, and 64 B per non-zero."""
    width = candidates if candidates is not None else n_atoms
    return 4 * (3 * width + (k * k if method == "omp" else 0)) + 8 * width + 64 * k + 4 * n_atoms


def fit_terms(d: int, learner: LearnerConfig, store: StorePlan, world: int, in_memory: bool) -> tuple[Term, ...]:
    """One rank's fit (:mod:`pipeline.core.learner`): its ``ceil(batch_size / world)`` rows of every sample batch
    and what is computed from them, and the dictionary-sized tensors every rank holds whole."""
    K, k = learner.n_atoms, learner.coder.k
    share = math.ceil(learner.batch_size / world)
    groups = matryoshka_groups(K, k, learner.matryoshka) if learner.matryoshka is not None else None
    width = code_width(learner.coder, groups)
    chunk = min(share, CODER_CHUNK_CAP)
    row = coder_row_bytes(K, k, learner.coder.method, learner.coder.candidates)
    terms = [
        Term(
            "store in memory (fp32, whole on every rank)" if in_memory else "streamed batch (this rank's rows)",
            store.fp32_bytes if in_memory else share * d * 4,
            f"{store.train_rows:,} × {d} × 4 B" if in_memory else f"{share:,} × {d} × 4 B",
        ),
        Term("sample batch, residual, padded residual", 3 * share * d * 4, f"3 × {share:,} × {d} × 4 B"),
        Term("dictionary", K * d * 4, f"{K} × {d} × 4 B"),
        Term("Gram matrix, old and new", 2 * K * K * 4, f"2 × {K}² × 4 B"),
        Term(
            "codes + the update's sorted entries",
            share * width * (12 + 24),
            f"{share:,} × {width} slots × (8 + 4 + 3 × 8) B",
        ),
        Term("coder working set", chunk * row, f"{chunk:,} rows × {row:,} B (at most a third of free memory)"),
        Term(
            "atom-update block",
            min(UPDATE_BLOCK_ENTRIES, share * width * d) * 4,
            f"min(2^28, {share:,} × {width} × {d}) × 4 B",
        ),
        Term("held-out rows", store.heldout_rows * d * 4, f"{store.heldout_rows:,} × {d} × 4 B"),
    ]
    return tuple(terms)


def baseline_terms(d: int, width: int, batch: int, store: StorePlan, in_memory: bool) -> tuple[Term, ...]:
    """One sae-lens SAE in training (one at a time, rank 0): fp32 parameters, gradients and Adam's two moments,
    one step's latent pre-activations, activations and their gradients, and the data."""
    params = 2 * width * d + width + d
    return (
        Term(
            "store in memory (fp32)" if in_memory else "streamed batch",
            store.fp32_bytes if in_memory else batch * d * 4,
            f"{store.train_rows:,} × {d} × 4 B" if in_memory else f"{batch} × {d} × 4 B",
        ),
        Term("SAE params + grads + Adam moments", 4 * params * 4, f"4 × {params:,} × 4 B (width {width})"),
        Term("one step's latents", 4 * batch * width * 4, f"4 × {batch} × {width} × 4 B"),
        Term("held-out rows", store.heldout_rows * d * 4, f"{store.heldout_rows:,} × {d} × 4 B"),
    )


def core_terms(arch: Architecture, evals: EvalConfig, learner: LearnerConfig, dtype_bytes: int) -> tuple[Term, ...]:
    """SAEBench core on the dictionary (the largest SAE: its Gram matrix), beside the model: the full-vocabulary
    logits of one batch of ``batch_size_prompts × context_size`` tokens (:data:`CORE_LIVE_LOGITS` of them), the
    SAE-independent forwards kept for reuse (``eval.core.reuse_forwards_mb``), the SAE's weights in the model
    dtype and its fp32 atoms and Gram matrix, and one batch's codes (dense, ``d_sae`` wide) and coder working
    set. Every other metric runs ``eval.llm_batch_size`` forwards that stop at the hook."""
    core = evals.core
    tokens = core.batch_size_prompts * core.context_size
    K, d, V = learner.n_atoms, arch.d_model, arch.d_vocab
    d_sae = 2 * K if (not learner.coder.nonnegative and evals.signed_export == "split") else K
    row = coder_row_bytes(K, learner.coder.k, learner.coder.method, learner.coder.candidates)
    logits = tokens * V * dtype_bytes
    return (
        Term(
            "core logits",
            CORE_LIVE_LOGITS * logits,
            f"{CORE_LIVE_LOGITS} × {core.batch_size_prompts} × {core.context_size} × {V} × {dtype_bytes} B",
        ),
        Term(
            "core's kept forwards",
            int(core.reuse_forwards_mb * 2**20),
            f"eval.core.reuse_forwards_mb {core.reuse_forwards_mb:g}",
        ),
        Term(
            "dictionary SAE (W_enc, W_dec; atoms, Gram)",
            2 * d_sae * d * dtype_bytes + K * d * 4 + K * K * 4,
            f"2 × {d_sae} × {d} × {dtype_bytes} B + {K} × {d} × 4 B + {K}² × 4 B",
        ),
        Term(
            "one batch's codes + coder working set",
            tokens * d_sae * dtype_bytes + min(tokens, CODER_CHUNK_CAP) * row,
            f"{tokens} × ({d_sae} × {dtype_bytes} B + {row:,} B)",
        ),
    )


def render(plan: Plan) -> str:
    """The plan as text: the model, the store, then each stage's terms and total."""
    m, s = plan.model, plan.store
    lines = [
        f"{plan.experiment}: {m.name} ({m.hf_class}), hook {', '.join(plan.hooks)}",
        f"  d_model {m.d_model}, {m.n_layers} layers, vocab {m.d_vocab:,}, {m.n_heads} heads ({m.n_kv_heads} kv) × "
        f"{m.d_head}, d_mlp {m.d_mlp}; {m.hf_params():,} params ({m.tl_params():,} as a HookedTransformer)",
        f"  model dtype {plan.model_dtype}, store dtype {plan.store_dtype}",
        f"store: {s.contexts:,} contexts ({s.heldout_contexts:,} held out), ≤ {s.train_rows:,} training rows, "
        f"{s.bytes_per_token:,} B of activations per token, {s.bytes_per_row:,.1f} B per row on disk, "
        f"{_gb(s.disk_bytes)} on disk",
        f"  fit from memory: {_gb(s.fp32_bytes)} in fp32, held on the GPU when ≥ {_gb(s.in_memory_needs_free)} is "
        f"free (" + ", ".join(f"{g}: {'yes' if ok else 'no, streamed'}" for g, ok in s.in_memory_on().items()) + ")",
    ]
    for stage in plan.stages:
        if stage.where == "rank 0" and stage.ranks > 1:
            lines.append(f"{stage.stage}, {stage.ranks} GPUs: on rank 0 alone, as on 1 GPU")
            continue
        fits = ", ".join(f"{g} {'fits' if ok else 'DOES NOT FIT'}" for g, ok in stage.fits().items())
        gpus = f"{stage.ranks} GPU{'s' if stage.ranks > 1 else ''}"
        lines.append(f"{stage.stage}, {gpus}, {stage.where}: {_gb(stage.total)} ({fits})")
        lines += [f"    {t.name:<45} {_gb(t.bytes):>10}   {t.shape}" for t in stage.terms]
        lines += [f"    host, per process: {t.name:<26} {_gb(t.bytes):>10}   {t.shape}" for t in stage.host_terms]
    lines.append("left out: " + "; ".join(plan.left_out))
    return "\n".join(lines)


__all__ = ["GPUS", "LEFT_OUT", "Plan", "StagePlan", "StorePlan", "Term", "plan_run", "render", "store_plan"]
