"""What a feature dashboard shows, as plain frozen dataclasses (no model, no tensors).

:func:`pm_lens.dashboard.build_dashboards` fills them from a reward model, its SAEs and the run's
pairs; :mod:`pm_lens.dashboard.render` turns them into HTML pages and
:mod:`pm_lens.dashboard.neuronpedia` into Neuronpedia's feature JSON. Every number is a Python
float or int, so a dashboard is written as JSON as it is (:meth:`FeatureDashboard.to_dict`) and
read back (:meth:`FeatureDashboard.from_dict`).

Sign convention (as everywhere in pm_lens): an *effect* is the change when the feature is
removed (negative: the feature raises the reward or margin); a *contribution* is what the feature
adds where it fires (positive: it raises the reward), i.e. minus the effect of removing it there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pm_lens.saes.contexts import Context
from pm_lens.saes.node import Node


@dataclass(frozen=True)
class Example(Context):
    """A window of one text where the feature fires: a :class:`pm_lens.saes.contexts.Context`
    (``pair`` indexes the run's pairs; ``peak`` is the firing the example is centred on, its
    strongest one, or in an interval group its strongest one inside the band) with, per token,
    the feature's reward contribution.

    Attributes:
        contributions: per token, the feature's estimated contribution to this text's reward from
            its activation there (attribution patching: ``-grad . d_f * (baseline - act)``);
            positive where it raises the reward, 0 where it does not fire.
    """

    contributions: list[float]


@dataclass(frozen=True)
class ExampleGroup:
    """Examples of one activation band.

    Attributes:
        title: e.g. ``"Top activations"`` or ``"Interval 0.52 - 1.04"``.
        bin_min, bin_max: the band of the examples' peak activations (``-1`` and the maximum for
            the top group, as Neuronpedia writes it).
        bin_contains: the share of all the feature's nonzero activations inside the band (``-1``
            for the top group).
        examples: strongest first in the top group, drawn at random (seeded) in an interval.
    """

    title: str
    bin_min: float
    bin_max: float
    bin_contains: float
    examples: list[Example]


@dataclass(frozen=True)
class Histogram:
    """The feature's nonzero activations over every token of the run's texts.

    Attributes:
        edges: ``n_bins + 1`` bin edges from 0 to the largest activation.
        counts: activations per bin (a bin holds ``edges[i] <= a < edges[i+1]``, the last one also
            its right edge, as ``numpy.histogram`` counts).
        n_tokens: tokens looked at (padding and skipped first tokens left out).
        n_nonzero: tokens where the feature fires.
    """

    edges: list[float]
    counts: list[int]
    n_tokens: int
    n_nonzero: int

    @property
    def density(self) -> float:
        """The share of tokens the feature fires on."""
        return self.n_nonzero / self.n_tokens if self.n_tokens else 0.0


@dataclass(frozen=True)
class Datapoint:
    """A pair where removing the feature changes the margin most (the study's view).

    Attributes:
        pair: index into the run's pairs.
        chosen_before, chosen_after, rejected_before, rejected_after: the rewards of both sides
            with the feature, and with it removed (exact ablation).
        margin_effect: ``(chosen_after - rejected_after) - (chosen_before - rejected_before)``.
        preference_flips: whether removing the feature flips which side the PM prefers.
    """

    pair: int
    chosen_before: float
    chosen_after: float
    rejected_before: float
    rejected_after: float
    margin_effect: float
    preference_flips: bool


@dataclass(frozen=True)
class DirectEffect:
    """The feature's direct effect on the reward, beside its total effect.

    The direct path is the decoder direction carried by the residual stream, unchanged, to the
    final norm and the reward head at the pooled (last) token; everything else (through attention
    and later MLPs) is indirect. ``per_unit`` is the reward-space analogue of a logit table: the
    reward change per unit of activation through the final norm (linearised at each text's final
    residual) and the head, averaged over the texts.

    Attributes:
        per_unit: mean over the texts of ``J_head(x_final) . v`` (``v`` the direction the feature
            writes into the residual stream).
        chosen, rejected, margin: mean over the pairs of the direct effect of removing the feature
            at the pooled token, ``(baseline - act_last) * J_head(x_final) . v``, per side and on
            the margin.
        total_margin: the mean exact effect of removing the feature everywhere (ablation), or
            None when it was not measured.
    """

    per_unit: float
    chosen: float
    rejected: float
    margin: float
    total_margin: float | None


@dataclass(frozen=True)
class CoFiring:
    """A feature that fires at the same tokens.

    Attributes:
        node: the other feature, ``"hook:index"``.
        both: tokens where both fire.
        jaccard: ``both / (tokens either fires on)``.
        share: ``both / (tokens this feature fires on)``.
    """

    node: str
    both: int
    jaccard: float
    share: float


@dataclass(frozen=True)
class LabelRow:
    """How the feature's firing tracks one value of a label the pairs carry.

    Attributes:
        label, value: the label (a ``meta`` key of the pairs, or ``attribute:NAME`` for a
            per-side attribute such as the demo's planted ones) and its value.
        n_pairs: pairs with that value.
        chosen_rate, rejected_rate: share of those pairs whose chosen (rejected) completion the
            feature fires in.
        chosen_peak, rejected_peak: mean of its largest activation in the chosen (rejected)
            completion.
    """

    label: str
    value: str
    n_pairs: int
    chosen_rate: float
    rejected_rate: float
    chosen_peak: float
    rejected_peak: float


@dataclass(frozen=True)
class FeatureDashboard:
    """Everything one feature's page shows (see the module docstring for the signs).

    Attributes:
        node: ``"hook:index"``.
        hook_name, feature: the SAE's hook and the feature's index.
        fires_on: the tokens it fires on most, as one short string (its automatic label).
        estimated_margin_effect, exact_margin_effect: from the run's ranking and confirmation
            (None when not measured).
        histogram, groups, datapoints, direct, cofiring, labels: the page's sections.
        label: an automatic label, the n-gram most characteristic of its firings against the
            run's texts (:mod:`pm_lens.saes.labels`).
    """

    node: str
    hook_name: str
    feature: int
    fires_on: str
    estimated_margin_effect: float | None
    exact_margin_effect: float | None
    histogram: Histogram
    groups: list[ExampleGroup]
    datapoints: list[Datapoint]
    direct: DirectEffect | None
    cofiring: list[CoFiring]
    labels: list[LabelRow]
    settings: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def key(self) -> Node:
        return Node(self.hook_name, self.feature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureDashboard:
        groups = [ExampleGroup(**{**g, "examples": [Example(**e) for e in g["examples"]]}) for g in data["groups"]]
        return cls(**{**data, "histogram": Histogram(**data["histogram"]), "groups": groups,
                      "datapoints": [Datapoint(**d) for d in data["datapoints"]],
                      "direct": None if data["direct"] is None else DirectEffect(**data["direct"]),
                      "cofiring": [CoFiring(**c) for c in data["cofiring"]],
                      "labels": [LabelRow(**r) for r in data["labels"]]})
