"""A :class:`~pipeline.baselines.config.BaselineSpec` as sae-lens objects: the architecture's training SAE
(with its own training config class), the ``SAETrainerConfig``, and the inference form of a trained SAE.

Nothing of the recipe is ours: the optimiser (Adam, grad-norm clipping at 1), lr schedule, AuxK loss, decoder
norm handling and dead-latent tracking are sae-lens's, set through these configs.
"""

from __future__ import annotations

from typing import Any

from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE

from pipeline.baselines.config import BaselineSpec

#: Training-config fields this package sets itself (``sae_options`` may not override them).
RESERVED_SAE_FIELDS = frozenset(
    {
        "d_in",
        "d_sae",
        "k",
        "dtype",
        "device",
        "normalize_activations",
        "metadata",
        "matryoshka_widths",
        "target_l0",
        "max_iterations",
        "residual_threshold",
    }
)
#: ``SAETrainerConfig`` fields this package sets itself (``trainer_options`` may not override them).
RESERVED_TRAINER_FIELDS = frozenset(
    {
        "total_training_samples",
        "train_batch_size_samples",
        "lr",
        "lr_warm_up_steps",
        "lr_decay_steps",
        "device",
        "logger",
        "dead_feature_window",
        "n_checkpoints",
        "checkpoint_path",
        "save_final_checkpoint",
    }
)
#: Rows used to estimate the ``expected_average_only_in`` scaling factor, a mean norm (sae-lens's default of 1000
#: batches is 4 M rows at batch 4096 and costs seconds of a CPU budget; still capped at its 1000 batches).
NORM_ESTIMATE_ROWS = 2**18


def sae_config_fields(
    spec: BaselineSpec, d_in: int, width: int, k: int, sparsity_warm_up_steps: int, device: str
) -> dict[str, Any]:
    """Keyword arguments of the architecture's sae-lens training config."""
    _check_reserved("sae_options", spec.sae_options, RESERVED_SAE_FIELDS)
    fields: dict[str, Any] = dict(
        d_in=d_in, d_sae=width, dtype="float32", device=device, normalize_activations=spec.normalization()
    )
    arch = spec.architecture
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        fields["k"] = k
    if arch == "matryoshka_batchtopk":
        fields["matryoshka_widths"] = spec.widths(width)
    if arch == "standard":
        fields.update(l1_coefficient=spec.l1_coefficient, l1_warm_up_steps=sparsity_warm_up_steps)
    if arch == "jumprelu":
        fields.update(
            jumprelu_sparsity_loss_mode=spec.jumprelu_sparsity_loss_mode,
            l0_coefficient=spec.l0_coefficient,
            l0_warm_up_steps=sparsity_warm_up_steps,
            jumprelu_bandwidth=spec.jumprelu_bandwidth,
            jumprelu_init_threshold=spec.jumprelu_init_threshold,
        )
        if spec.jumprelu_sparsity_loss_mode == "quadratic":
            fields["target_l0"] = float(k)
    if arch == "matching_pursuit":
        # decoder_init_norm must be 1.0 for MP-SAEs (sae-lens resets it with a warning otherwise)
        fields.update(
            residual_threshold=spec.mp_residual_threshold,
            decoder_init_norm=1.0,
            max_iterations=spec.mp_max_iterations or k,
        )
    fields.update(spec.sae_options)
    return fields


def build_training_sae(
    spec: BaselineSpec, d_in: int, width: int, k: int, sparsity_warm_up_steps: int, device: str
) -> TrainingSAE:
    """A freshly initialised sae-lens training SAE of the spec's architecture, ``W_dec: (width, d_in)``."""
    sae_cls, cfg_cls = get_sae_training_class(spec.architecture)
    cfg = cfg_cls(**sae_config_fields(spec, d_in, width, k, sparsity_warm_up_steps, device))
    return sae_cls(cfg).to(device)


def trainer_config(
    spec: BaselineSpec,
    total_samples: int,
    lr_decay_steps: int,
    dead_feature_window: int,
    device: str,
    logging: dict[str, Any] | None = None,
) -> SAETrainerConfig:
    """sae-lens's trainer config: ``total_samples`` ends ``fit()``'s loop; ``dead_feature_window`` in steps;
    checkpoints off; wandb and sae-lens's evals off unless ``logging`` (``LoggingConfig`` fields, e.g. from
    :func:`pipeline.utils.tracking.sae_lens_logging`) turns wandb logging on."""
    _check_reserved("trainer_options", spec.trainer_options, RESERVED_TRAINER_FIELDS)
    options: dict[str, Any] = dict(
        lr_end=spec.lr / 10,  # the runner's default (used by cosine schedules only)
        n_batches_for_norm_estimate=min(1000, -(-NORM_ESTIMATE_ROWS // spec.batch_size)),
    )
    options.update(spec.trainer_options)
    return SAETrainerConfig(
        total_training_samples=total_samples,
        train_batch_size_samples=spec.batch_size,
        lr=spec.lr,
        lr_warm_up_steps=spec.lr_warm_up_steps,
        lr_decay_steps=lr_decay_steps,
        device=device,
        dead_feature_window=dead_feature_window,
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(**(logging or dict(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))),
        **options,
    )


def inference_form(training_sae: TrainingSAE) -> SAE:
    """The inference SAE sae-lens saves for ``training_sae`` (``save_inference_model``), built in memory: the
    same state-dict processing (TopK decoder norms folded; BatchTopK / Matryoshka become JumpReLU with the
    learned global threshold) and the same inference config."""
    state = {name: t.detach().clone() for name, t in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state)
    return sae.to(training_sae.device).eval()


def _check_reserved(name: str, options: dict[str, Any], reserved: frozenset[str]) -> None:
    clash = sorted(set(options) & reserved)
    if clash:
        raise ValueError(f"{name} may not set {clash}: they come from the spec, the width / k or the budget.")


__all__ = ["build_training_sae", "inference_form", "sae_config_fields", "trainer_config"]
