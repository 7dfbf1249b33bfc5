"""TopK SAE baseline (Gao et al. 2024), trained on the same data interface as the dictionary learner.

A small trainer of our own rather than sae-lens's: sae-lens's trainer is tied to its ActivationsStore and a
language model, while this one consumes exactly what :func:`pipeline.core.learner.learn_dictionary` consumes (a
tensor or an iterable of activation batches), so both see the same samples. Recipe: unit-norm decoder rows
(renormalised after each step, gradient component along the rows removed), ``b_dec`` initialised at the data
mean, encoder initialised as the decoder's transpose, Adam with lr ``2e-4 / sqrt(K / 2^14)``, and the AuxK
loss (top ``aux_k`` dead latents reconstruct the residual, weight 1/32) against dead latents.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline.core.codes import Codes
from pipeline.utils.atomic import atomic_write, atomic_write_text
from pipeline.utils.devices import resolve_device
from pipeline.core.validation import check_samples, check_sparsity

#: Weights and config of a saved TopK SAE.
TOPK_WEIGHTS = "topk_sae.safetensors"
TOPK_CONFIG = "topk_sae.json"


@dataclass
class TopKConfig:
    """Options of :func:`train_topk_sae`."""

    n_latents: int | None = None
    """Width K (the pipeline trains the baseline at the dictionary's width: leave it unset there)."""
    k: int | None = None
    """Active latents per sample (the pipeline uses the dictionary's k: leave it unset there)."""
    lr: float | None = None
    """Adam learning rate; None: 2e-4 / sqrt(K / 2^14) (Gao et al.)."""
    batch_size: int = 4096
    """Samples per optimiser step."""
    max_steps: int | None = None
    """Optimiser-step cap."""
    epochs: int | None = 1
    """Passes over the data (None: no cap)."""
    time_budget: float | None = None
    """Stop after this many seconds."""
    aux_k: int = 512
    """Dead latents used by the AuxK loss."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_after: int = 200_000
    """A latent that has not fired for this many samples counts as dead."""
    seed: int = 0
    """Seed of init and sample order."""
    device: str | None = None
    """Where to train (default: the tensor's device, else CUDA when available)."""
    precision: str = "fp32"
    """Matmuls on CUDA: "fp32", "tf32" (tensor cores, fp32 storage) or "bf16" (autocast)."""
    progress: bool = True
    """Show a tqdm bar."""


class TopKSAE(nn.Module):
    """``encode(x) = TopK(relu((x − b_dec) W_enc + b_enc))``, ``decode(f) = f W_dec + b_dec``."""

    def __init__(self, d: int, n_latents: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(torch.zeros(d, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.history: list[dict[str, Any]] = []

    @property
    def n_latents(self) -> int:
        return self.W_dec.shape[0]

    def pre_acts(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    @torch.no_grad()
    def encode_sparse(self, x: Tensor) -> Codes:
        """Codes ``(n, k)`` of ``x: (n, d)``."""
        vals, idx = self.pre_acts(x).topk(self.k, dim=-1)
        return Codes(idx, vals)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Dense (…, K) activations of ``x: (…, d)``."""
        codes = self.encode_sparse(x.reshape(-1, x.shape[-1]))
        return codes.to_dense(self.n_latents).reshape(*x.shape[:-1], -1)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        codes = self.encode_sparse(x)
        return codes.decode(self.W_dec) + self.b_dec

    @torch.no_grad()
    def fvu(self, Y: Tensor, chunk: int = 8192) -> float:
        err = 0.0
        for s in range(0, Y.shape[0], chunk):
            y = Y[s:s + chunk].to(self.W_dec.device, torch.float32)
            err += float((y - self(y)).pow(2).sum())
        return err / float((Y.float() - Y.float().mean(0)).pow(2).sum().clamp(min=1e-30))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/<TOPK_WEIGHTS>`` and ``path/<TOPK_CONFIG>`` (each atomically: temp file, then rename)."""

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / TOPK_WEIGHTS, lambda p: save_file(tensors, str(p)))
        atomic_write_text(path / TOPK_CONFIG, json.dumps(
            {"d": self.W_dec.shape[1], "n_latents": self.n_latents, "k": self.k, "history": self.history}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "TopKSAE":
        path = Path(path)
        cfg = json.loads((path / TOPK_CONFIG).read_text())
        sae = cls(cfg["d"], cfg["n_latents"], cfg["k"])
        sae.load_state_dict(load_file(str(path / TOPK_WEIGHTS)))
        sae.history = cfg.get("history", [])
        return sae.to(device)


def train_topk_sae(data: Tensor | Iterable[Tensor], n_latents: int, k: int, callback=None,
                   **options) -> TopKSAE:
    """Train a TopK SAE of width ``n_latents`` on ``data`` ((n, d) tensor or iterable of (b, d) batches)."""
    unknown = set(options) - {f.name for f in fields(TopKConfig)}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; valid options are the fields of TopKConfig.")
    cfg = TopKConfig(n_latents=n_latents, k=k, **options)
    if cfg.precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision = {cfg.precision!r} is not one of fp32, tf32, bf16.")
    with _precision(cfg.precision), torch.enable_grad():  # whatever a caller (e.g. SAEBench) left switched off
        return _train(data, cfg, callback)


@contextlib.contextmanager
def _precision(precision: str):
    """tf32 matmuls or bf16 autocast on CUDA for the duration of training (no effect on CPU)."""
    if not torch.cuda.is_available() or precision == "fp32":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        if precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _train(data, cfg: TopKConfig, callback) -> TopKSAE:
    n_latents, k = cfg.n_latents, cfg.k
    batches = _minibatches(data, cfg, epoch=0)
    first = next(batches)
    d = first.shape[1]
    check_sparsity(k, n_latents, d)
    device = resolve_device(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    sae = TopKSAE(d, n_latents, k).to(device)
    with torch.no_grad():
        W = torch.randn(n_latents, d, generator=g).to(device)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(first.to(device).float().mean(0))
    lr = cfg.lr or 2e-4 / math.sqrt(n_latents / 2 ** 14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
    t0, step, epoch = time.perf_counter(), 0, 0
    bar = tqdm(total=cfg.max_steps, disable=not cfg.progress, desc="TopK SAE", unit="step")
    pending: Iterator[Tensor] = _prepend(first, batches)
    while True:
        for x in pending:
            x = x.to(device, torch.float32)
            loss, mse, fired = _step_loss(sae, x, since_fired >= cfg.dead_after, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _remove_parallel_grad(sae)
            opt.step()
            with torch.no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12))
            since_fired += x.shape[0]
            since_fired[fired] = 0
            step += 1
            rec = dict(step=step, epoch=epoch, fvu=float(mse), seconds=time.perf_counter() - t0,
                       dead_fraction=float((since_fired >= cfg.dead_after).float().mean()))
            sae.history.append(rec)
            bar.update(1)
            bar.set_postfix(fvu=f"{rec['fvu']:.4f}", dead=f"{rec['dead_fraction']:.3f}")
            if callback is not None:
                callback(step, rec, sae)
            if (cfg.max_steps is not None and step >= cfg.max_steps) or \
                    (cfg.time_budget is not None and rec["seconds"] >= cfg.time_budget):
                bar.close()
                return sae
        epoch += 1
        if cfg.epochs is not None and epoch >= cfg.epochs:
            bar.close()
            return sae
        pending = _minibatches(data, cfg, epoch)


def _step_loss(sae: TopKSAE, x: Tensor, dead: Tensor, cfg: TopKConfig) -> tuple[Tensor, Tensor, Tensor]:
    pre = sae.pre_acts(x)
    vals, idx = pre.topk(cfg.k, dim=-1)
    recon = Codes(idx, vals).decode(sae.W_dec) + sae.b_dec
    err = x - recon
    var = (x - x.mean(0)).pow(2).sum()
    mse = err.pow(2).sum() / var
    loss = mse
    n_dead = int(dead.sum())
    if n_dead > 0 and cfg.aux_coef > 0:
        aux_vals, aux_idx = pre.masked_fill(~dead, 0).topk(min(cfg.aux_k, n_dead), dim=-1)
        aux = Codes(aux_idx, aux_vals).decode(sae.W_dec)
        loss = loss + cfg.aux_coef * (err.detach() - aux).pow(2).sum() / var
    fired = idx[vals > 0].unique()
    return loss, mse.detach(), fired


def _remove_parallel_grad(sae: TopKSAE) -> None:
    """Drop the gradient component along each decoder row (the rows are renormalised after the step)."""
    if sae.W_dec.grad is None:
        return
    W = sae.W_dec.data
    sae.W_dec.grad -= (sae.W_dec.grad * W).sum(dim=1, keepdim=True) * W


def _minibatches(data: Tensor | Iterable[Tensor], cfg: TopKConfig, epoch: int) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        check_samples(data, "data")
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(data.shape[0], generator=g).to(data.device)
        for s in range(0, data.shape[0] - cfg.batch_size + 1 if data.shape[0] >= cfg.batch_size else 1,
                       cfg.batch_size):
            yield data[perm[s:s + cfg.batch_size]]
        return
    for batch in data:
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch
        for s in range(0, batch.shape[0], cfg.batch_size):
            yield batch[s:s + cfg.batch_size]


def _prepend(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


__all__ = ["TopKSAE", "TopKConfig", "train_topk_sae"]
