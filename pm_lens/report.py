"""An attribution run as one self-contained HTML page: the finding first, then the evidence.

The page has no scripts and no external files, so it opens anywhere and can be mailed around.
Sections: the findings when given (:class:`Finding`: per question, e.g. per planted attribute,
a verdict, the features that carry it with their labels and exact effects, and a few of their
contexts with the firing highlighted); the ranked features (raising, then lowering); the feature
dashboards; the fidelity card; any extra tables (e.g. a recovery table); for each ranked feature,
the contexts it fires on most, each token shaded by the feature's activation (completion tokens
underlined, prompt tokens grey; a token left out of the contexts, such as the last one, reads 0);
the run's settings last. Tables wrap their cells to fit a laptop's window (1400 px).
"""

from __future__ import annotations

import html
import json
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dataclasses import dataclass, field

import pandas as pd

from pm_lens.attribution.fidelity import FidelityCard
from pm_lens.io import write_atomic
from pm_lens.saes.contexts import Context, FeatureContexts
from pm_lens.saes.node import Node

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1250px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; overflow-wrap: anywhere; }
td { max-width: 22em; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: 0.8em; }
.context { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; margin: 3px 0; }
.prompt { color: #888; } .completion { text-decoration: underline dotted #aaa; }
.peak { outline: 1px solid #b00; }
.feature { margin-bottom: 1.5em; }
.note { color: #555; font-size: 0.9em; }
.finding { border-left: 4px solid #999; padding: 0.2em 0 0.2em 1em; margin: 1em 0 2em; }
.finding.ok { border-color: #2a8a3a; } .finding.miss { border-color: #c0392b; }
.finding h3 { margin: 0.3em 0; } .verdict { margin: 0.3em 0; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; }
"""


@dataclass(frozen=True)
class Finding:
    """One answer at the top of a report, e.g. what carries one planted attribute.

    Attributes:
        title: the question answered, e.g. ``"closer (planted: raises reward)"``.
        verdict: one or two sentences of plain words with the numbers that settle it.
        features: the features that carry it, one row each, with ``hook_name`` and ``feature``
            (shown as a linked node) and the columns to show.
        contexts: how many contexts of each feature to show (highlighted), from the report's
            ``contexts``.
        ok: whether it checks out (a green or red bar); ``None``: no judgement.
    """

    title: str
    verdict: str
    features: pd.DataFrame = field(default_factory=pd.DataFrame)
    contexts: int = 2
    ok: bool | None = None


def render_report(
    *,
    title: str,
    settings: Mapping[str, Any],
    features: pd.DataFrame,
    card: FidelityCard,
    contexts: Mapping[Node, FeatureContexts],
    tables: Mapping[str, pd.DataFrame] | None = None,
    notes: Mapping[str, str] | None = None,
    dashboards: Mapping[str, str] | None = None,
    findings: Sequence[Finding] = (),
    lead: str = "",
    feature_columns: Sequence[str] | None = None,
) -> str:
    """The report as an HTML string.

    Args:
        features: one row per ranked feature with at least ``hook_name`` and ``feature``, and
            either ``direction`` ("raises"/"lowers", or ``top_features``' "raising"/"lowering")
            or a removal effect (``exact_margin_effect``, ``estimated_margin_effect``,
            ``effect``: negative means the feature raises reward), e.g.
            ``attribute(...).top_features()`` or ``pm-lens run``'s ``features.csv``.
        contexts: :func:`pm_lens.saes.contexts.top_contexts` of those features.
        tables: extra titled tables, shown after the fidelity card.
        notes: a paragraph under a section, by section title.
        dashboards: per node (``"hook:index"``), the relative link to its feature dashboard page
            (:mod:`pm_lens.dashboard`): the node cells of the feature tables link there, and a
            "Feature dashboards" section lists them.
        findings: shown first, under "Findings" (see :class:`Finding`).
        lead: a paragraph of plain words under the title, before everything else.
        feature_columns: the columns of ``features`` shown in its tables (default: all); every
            column is in the CSV files a run writes.
    """
    notes = notes or {}
    features = with_direction(features)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             "<meta name='viewport' content='width=device-width'>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    if lead:
        parts.append(f"<p class='verdict'>{_e(lead)}</p>")
    if findings:
        parts.append(_section("Findings", notes))
        parts += [_finding(finding, contexts, dashboards) for finding in findings]
    shown = features if feature_columns is None else features[[c for c in feature_columns if c in features]]
    for direction in ("raises", "lowers"):
        heading = f"Features that {'raise' if direction == 'raises' else 'lower'} reward"
        sign = (f"Every effect is the change when the feature is removed: removing one of these "
                f"{'lowers' if direction == 'raises' else 'raises'} reward (effect {'< 0' if direction == 'raises' else '> 0'}).")
        note = f"{notes[heading]} {sign}" if heading in notes else sign
        rows = features.direction == direction
        parts += [_section(heading, {heading: note}), _table(shown[rows.to_numpy()], dashboards or {}, node_of=features[rows])]
    if dashboards:
        links = "".join(f"<li><a href='{_e(href)}'>{_e(node)}</a></li>" for node, href in dashboards.items())
        index = posixpath.join(posixpath.dirname(next(iter(dashboards.values()))), "index.html")
        parts += [_section("Feature dashboards", notes), f"<p><a href='{_e(index)}'>all dashboards</a></p><ul>{links}</ul>"]
    parts += [_section("Fidelity", notes), f"<pre>{_e(str(card))}</pre>"]
    for name, table in (tables or {}).items():
        parts += [_section(name, notes), _table(table)]
    parts.append(_section("Where the features fire", notes))
    for row in features.itertuples():
        found = contexts.get(Node(row.hook_name, int(row.feature)))
        if found is not None:
            parts.append(_feature_block(found, row.direction))
    parts += [_section("Settings", notes),
              f"<details><summary>the run's settings, versions and timings</summary>"
              f"<pre>{_e(json.dumps(settings, indent=2, default=str))}</pre></details>", "</body></html>"]
    return "\n".join(parts)


def write_report(path: str | Path, **kwargs: Any) -> None:
    """Render the report (see :func:`render_report`) and write it atomically."""
    write_atomic(path, render_report(**kwargs))


EFFECT_COLUMNS = ("exact_margin_effect", "estimated_margin_effect", "effect")
WORDS = {"raises": "raises", "lowers": "lowers", "raising": "raises", "lowering": "lowers"}


def with_direction(features: pd.DataFrame) -> pd.DataFrame:
    """``features`` with a ``direction`` column ("raises"/"lowers" reward): kept (in either
    spelling) when there is one, else from the sign of the first removal-effect column."""
    if "direction" in features:
        unknown = sorted(set(features.direction) - set(WORDS))
        if unknown:
            raise ValueError(f"direction must be 'raises' or 'lowers' (or 'raising'/'lowering'), got {unknown}")
        return features.assign(direction=features.direction.map(WORDS))
    column = next((c for c in EFFECT_COLUMNS if c in features), None)
    if column is None:
        raise ValueError(f"the features table needs a 'direction' column or an effect column ({', '.join(EFFECT_COLUMNS)}); "
                         f"it has {list(features.columns)}")
    # A removal effect below zero: removing the feature lowers reward, so the feature raises it.
    return features.assign(direction=["raises" if e < 0 else "lowers" for e in features[column]])


def _e(text: Any) -> str:
    return html.escape(str(text))


def _section(title: str, notes: Mapping[str, str]) -> str:
    note = f"<p class='note'>{_e(notes[title])}</p>" if title in notes else ""
    return f"<h2>{_e(title)}</h2>{note}"


def _finding(finding: Finding, contexts: Mapping[Node, FeatureContexts], dashboards: Mapping[str, str] | None) -> str:
    state = "" if finding.ok is None else " ok" if finding.ok else " miss"
    parts = [f"<div class='finding{state}'><h3>{_e(finding.title)}</h3><p class='verdict'>{_e(finding.verdict)}</p>"]
    table = finding.features
    if len(table):
        shown = table.drop(columns=[c for c in ("hook_name", "feature") if c in table])
        parts.append(_table(shown, dashboards or {}, node_of=table))
        for row in table.itertuples():
            found = contexts.get(Node(row.hook_name, int(row.feature)))
            for context in (found.contexts[: finding.contexts] if found else []):
                parts.append(_context_line(context, prefix=f"{found.node}: "))
            if found is not None and not found.contexts:
                parts.append(f"<p class='note'>{_e(found.node)}: {_e(found.silence())}</p>")
    parts.append("</div>")
    return "".join(parts)


def _table(table: pd.DataFrame, dashboards: Mapping[str, str] | None = None, *, node_of: pd.DataFrame | None = None) -> str:
    """The table as HTML; with ``dashboards``, node names link to their pages. ``node_of``: the
    rows (same index) that hold ``hook_name`` and ``feature`` when ``table`` does not."""
    if dashboards is None:
        return table.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0, escape=True)
    source = table if node_of is None else node_of
    table = table.copy()
    nodes = source["node"] if "node" in source else pd.Series(
        [str(Node(h, int(f))) for h, f in zip(source.hook_name, source.feature)], index=source.index)
    for column in table.columns:
        if not pd.api.types.is_numeric_dtype(table[column]):
            table[column] = table[column].map(lambda v: _e(v) if isinstance(v, str) else v)
    link = [f"<a href='{_e(dashboards[n])}'>{_e(n)}</a>" if n in dashboards else _e(n) for n in nodes]
    table = table.drop(columns=[c for c in ("hook_name", "feature") if c in table])
    if "node" in table:
        table["node"] = link
    else:
        table.insert(0, "node", link)
    return table.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0, escape=False)


def _feature_block(found: FeatureContexts, direction: str) -> str:
    header = (f"<h3>{_e(found.node)} ({_e(direction)} reward)</h3>"
              f"<p class='note'>fires on {100 * found.firing_rate:.2f}% of tokens; most on "
              f"{_e(found.describe(5))}; mean activation at the last token {found.last_token_mean:.3g}</p>")
    lines = [_context_line(context) for context in found.contexts] or [f"<p class='note'>{_e(found.silence())} "
                                                                        "on these texts</p>"]
    return f"<div class='feature'>{header}{''.join(lines)}</div>"


def _context_line(context: Context, *, prefix: str = "") -> str:
    peak = max(context.max_act, 1e-12)
    spans = []
    for i, (token, act) in enumerate(zip(context.tokens, context.acts)):
        classes = ["completion" if i >= context.completion_start else "prompt"] + (["peak"] if i == context.peak else [])
        shade = f"background: rgba(255, 120, 0, {min(1.0, max(0.0, act / peak)):.2f});" if act > 0 else ""
        text = token.replace("\n", "⏎")
        spans.append(f"<span class='{' '.join(classes)}' style='{shade}' title='{act:.3g}'>{_e(text)}</span>")
    where = f"{prefix}pair {context.pair}, {context.side}, max {context.max_act:.3g}: "
    return f"<div class='context'><span class='note'>{_e(where)}</span>{''.join(spans)}</div>"
