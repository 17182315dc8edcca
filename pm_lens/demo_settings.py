"""What ``pm-lens demo`` runs and writes, kept apart from :mod:`pm_lens.demo` so that the command
line can show the defaults without importing torch, TransformerLens and SAELens."""

from __future__ import annotations

from dataclasses import dataclass

POSITIONS = ("diverge", "completion", "all")  # pm_lens.attribution.positions (not imported: torch)
OUTPUTS = ("features.csv", "fidelity.json", "recovery.csv", "report.html", "dashboards/index.html", "config.json")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; saved to ``config.json`` beside the results."""

    pairs_per_attribute: int = 6
    top: int = 3
    fidelity_top: int = 10
    n_random: int = 10
    recovery_top: int = 10
    n_contexts: int = 5
    seed: int = 0
    dataset_seed: int = 0  # the planted dataset the demo PM was trained on
    batch_tokens: int = 4096
    # Where the margin is attributed and features are read: from the first token where chosen and
    # rejected differ, as the study did ("diverge"); "completion" or "all" (the prompt and chat
    # template too, shared by both sides) are there to compare.
    positions: str = "diverge"

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
