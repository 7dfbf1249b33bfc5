"""The ``dashboards`` config node: which latents of every SAE get a dashboard, and what each shows."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DashboardsConfig:
    """Feature dashboards (the ``dashboards`` stage): for a sample of latents of every SAE, the contexts it fires
    on (top activations and samples across its range), its activation histogram and frequency, and the tokens it
    promotes and suppresses through the unembedding. Activations come from the harvest store's rows and token ids."""

    enabled: bool = True
    """False: the stage writes nothing but its marker (the report then links no dashboards)."""
    saes: list[str] = field(default_factory=lambda: ["dictionary", "baselines"])
    """SAEs to draw: ``dictionary``, ``baselines`` (every trained baseline) and/or baselines by name."""
    n_most_used: int = 8
    """The latents that fire most often."""
    n_random: int = 8
    """Latents drawn at random among those that fire at least ``min_count`` times."""
    include: list[int] = field(default_factory=list)
    """Latent indices drawn for every SAE that has them (e.g. ones a paper discusses)."""
    from_metrics: int = 8
    """Up to this many latents a metric singled out (autointerp's judged latents, with their explanation and
    score), when the evaluate stage ran it."""
    min_count: int = 5
    """Rows a latent must fire on to be drawn at random."""
    max_rows: int = 262_144
    """Store rows read (held-out first, then train, in store order); every dashboard is computed over these."""
    batch_size: int = 4096
    """Rows encoded at once."""
    n_top: int = 10
    """Top-activating contexts shown per latent (windows that would overlap one already shown are skipped)."""
    n_intervals: int = 4
    """The latent's non-zero activation range is cut into this many quantile intervals ..."""
    n_per_interval: int = 3
    """... and this many contexts are sampled from each."""
    window_before: int = 12
    """Tokens shown before the activating token."""
    window_after: int = 4
    """Tokens shown after it."""
    n_logits: int = 10
    """Top promoted and top suppressed tokens shown."""
    histogram_bins: int = 32
    """Bins of the activation histogram."""
    seed: int = 0
    """Seed of the random latents and the interval samples."""
    device: str | None = None
    """Device of the encoding (None: ``eval.device``, else ``model.device``)."""

    def validate(self) -> None:
        """``ValueError`` naming ``dashboards.<key>`` for a value out of range."""
        for key in (
            "n_most_used",
            "n_random",
            "from_metrics",
            "min_count",
            "n_per_interval",
            "window_before",
            "window_after",
            "n_logits",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"dashboards.{key}={getattr(self, key)} must be >= 0")
        for key in ("max_rows", "batch_size", "n_top", "n_intervals", "histogram_bins"):
            if getattr(self, key) < 1:
                raise ValueError(f"dashboards.{key}={getattr(self, key)} must be >= 1")
        if any(i < 0 for i in self.include):
            raise ValueError(f"dashboards.include={self.include} must hold latent indices >= 0")
