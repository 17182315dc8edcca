"""How much of a group of pairs' margin the top features explain, checked by joint ablation.

Where the pairs of a group differ in one known way (one planted attribute, one kind of edit), the
group's mean margin is the reward effect of that difference. If the features an attribution ranks
first are what carries it, removing them together should remove most of that margin. This is the
"faithfulness" measure of circuit discovery (Marks et al. 2024, "Sparse Feature Circuits"): the
fraction of a behaviour a small set of nodes accounts for.

Steps of :func:`recover` (per group):
1. rank the features of the chosen hooks by their mean estimated effect over the group's pairs,
   keeping those whose removal moves the margin against its sign (they carry the margin, not
   oppose it), and take the first ``top_n``;
2. remove them jointly on the group's pairs (exact ablation, the attribution's own baselines,
   positions and first-token setting); each hook's delta is computed from the clean run;
3. report the clean mean margin (from the attribution's own clean run), the exact change, the
   fraction removed ``-mean(change) / mean(margin)``, and the attribution's own estimate of that change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from pm_lens.attribution.result import Attribution
from pm_lens.attribution.fidelity import ablate_like
from pm_lens.model import RewardModel
from pm_lens.saes.node import Node


def recover(
    rm: RewardModel,
    attribution: Attribution,
    groups: Mapping[str, Sequence[int]] | None = None,
    *,
    top_n: int = 10,
    hook_names: Sequence[str] | None = None,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> pd.DataFrame:
    """Ablate each group's top ``top_n`` features jointly and measure the margin they remove.

    Args:
        attribution: a ``target="margin"`` attribution of the pairs the groups index into.
        groups: name -> indices into ``attribution.pairs`` (default: one group of every pair).
        hook_names: rank only the features of these hooks (default: every attributed hook).

    Returns:
        One row per group: ``group``, ``n_pairs``, ``margin`` (clean mean), ``removed`` (exact mean
        change of the margin), ``fraction_removed``, ``estimated`` (sum of the top features' mean
        attributions), ``features`` (``hook_name:index`` of the ablated ones, best first).
    """
    if attribution.settings.target != "margin":
        raise ValueError(f"recover needs a target='margin' attribution, got target={attribution.settings.target!r}")
    groups = groups if groups is not None else {"all": range(attribution.n_pairs)}
    hooks = list(hook_names) if hook_names is not None else list(attribution.effects)
    unknown = [h for h in hooks if h not in attribution.effects]
    if unknown:
        raise ValueError(f"no attribution for hooks {unknown}; attributed hooks are {list(attribution.effects)}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    indices = {}
    for name, group in groups.items():
        index = torch.as_tensor(list(group), dtype=torch.long)
        if len(index) == 0 or int(index.min()) < 0 or int(index.max()) >= attribution.n_pairs:
            raise ValueError(f"group {name!r} must hold indices in 0..{attribution.n_pairs - 1}, got {list(group)[:10]}")
        indices[name] = index
    rows = []
    for name, index in tqdm(indices.items(), desc="recovering", disable=not progress or len(indices) < 2):
        margin = float(attribution.clean_margin[index].mean())
        rows.append(_recover_group(rm, attribution, name, index, margin, hooks, top_n, batch_tokens))
    return pd.DataFrame(rows)


def recovered_features(features: str) -> list[Node]:
    """The nodes of a recovery row's ``features`` column, best first."""
    return [Node.parse(name) for name in features.split()]


def _recover_group(rm: RewardModel, attribution: Attribution, name: str, index: torch.Tensor, margin: float,
                   hooks: list[str], top_n: int, batch_tokens: int) -> dict:
    group = attribution.subset(index.tolist())
    candidates = [(Node(hook, feature), float(effect))
                  for hook in hooks
                  for feature, effect in enumerate(group.dense_effects(hook).mean(0).tolist())]
    sign = 1.0 if margin >= 0 else -1.0
    # Removing a feature that carries the margin moves it against its sign.
    carriers = sorted((c for c in candidates if c[1] * sign < 0), key=lambda c: c[1] * sign)[:top_n]
    if not carriers:
        return dict(group=name, n_pairs=len(index), margin=margin, removed=0.0, fraction_removed=0.0, estimated=0.0,
                    features="")
    joint = ablate_like(rm, group, [node for node, _ in carriers], jointly=True, batch_tokens=batch_tokens, progress=False)
    removed = float(joint.margin.mean())
    return dict(
        group=name, n_pairs=len(index), margin=margin, removed=removed,
        fraction_removed=-removed / margin if margin != 0 else float("nan"),
        estimated=sum(e for _, e in carriers),
        features=" ".join(str(node) for node, _ in carriers),
    )
