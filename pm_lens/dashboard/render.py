"""Feature dashboards as static HTML pages: one page per feature and an index.

Each page is self-contained (inline CSS and SVG, no scripts, no external files), so it opens
offline and can be mailed around. Every section carries a short note on how to read it:

1. Header: the node, the tokens it fires on most, its estimated and exact margin effect.
2. Activations: how often it fires and a histogram of its nonzero activations (inline SVG; hover a
   bar for its range and count).
3. Examples: per activation band, windows of text shown twice, shaded by the feature's activation
   (orange) and by its per-token contribution to the reward (green raises, red lowers). Prompt
   tokens are grey, completion tokens underlined, the peak token outlined; every token's number
   is in its ``title`` (tooltip) and ``data-value``.
4. Where removing it matters most: the pairs whose margin moves most under exact ablation.
5. Direct and total effect: the direct path to the reward head beside the total effect.
6. Fires together with: features firing at the same tokens.
7. Labels: how its firing tracks labels the pairs carry.

Signs as in :mod:`pm_lens.dashboard.data`: an effect is the change when the feature is removed.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pm_lens.dashboard.data import Example, FeatureDashboard, Histogram
from pm_lens.io import write_atomic

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; overflow-wrap: anywhere; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
.example { margin: 0.6em 0 1em; }
.line { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap;
        overflow-wrap: anywhere; margin: 2px 0; line-height: 1.6; }
.prompt { color: #888; } .completion { text-decoration: underline dotted #888; }
.peak { outline: 1px solid #224; }
svg rect { fill: #4a78b5; }
pre { background: #f7f7f7; padding: 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; }
"""
_ORANGE, _GREEN, _RED = "255, 120, 0", "0, 170, 0", "220, 0, 0"


def render_feature_page(dashboard: FeatureDashboard, *, index_href: str = "index.html", title: str = "") -> str:
    """One feature's dashboard as a self-contained HTML page (see the module docstring)."""
    d = dashboard
    title = title or f"pm_lens feature {d.node}"
    parts = [_head(title), f"<p><a href='{_e(index_href)}'>&larr; all features</a></p>", f"<h1>{_e(title)}</h1>",
             _header(d), _activations(d.histogram), _examples(d)]
    parts.append(_section("datapoints", "Where removing it matters most",
                          "The pairs whose margin r(chosen) - r(rejected) changes most when the feature is removed "
                          "(exact ablation). Rewards read before &rarr; after removal; flips says whether the "
                          "preferred side changes."))
    parts.append(_table(["pair", "chosen", "rejected", "margin effect", "flips"],
                        [[p.pair, f"{_g(p.chosen_before)} &rarr; {_g(p.chosen_after)}",
                          f"{_g(p.rejected_before)} &rarr; {_g(p.rejected_after)}", _s(p.margin_effect),
                          "yes" if p.preference_flips else "no"] for p in d.datapoints], "no pairs measured"))
    parts.append(_direct(d))
    parts.append(_section("cofiring", "Fires together with",
                          "Features firing at the same tokens: both = tokens where both fire, jaccard = both / "
                          "tokens where either fires, share = both / tokens where this feature fires."))
    parts.append(_table(["node", "both", "jaccard", "share"],
                        [[_e(c.node), c.both, _g(c.jaccard), _g(c.share)] for c in d.cofiring], "none found"))
    parts.append(_labels(d))
    parts.append(f"<h2>Settings</h2><pre>{_e(json.dumps(d.settings, indent=1, default=str))}</pre></body></html>")
    return "\n".join(parts)


def render_index(dashboards: list[FeatureDashboard], *, title: str, links: dict[str, str]) -> str:
    """A page listing the features, each node linked to ``links[node]`` (a relative href)."""
    rows = [[f"<a href='{_e(links[d.node])}'>{_e(d.node)}</a>" if d.node in links else _e(d.node), _e(d.fires_on),
             _s(d.estimated_margin_effect), _s(d.exact_margin_effect), _pct(d.histogram.density)]
            for d in dashboards]
    note = ("Margin effect = change of the margin r(chosen) - r(rejected) when the feature is removed; negative "
            "means the feature raises the margin. Density = share of tokens the feature fires on.")
    return "\n".join([_head(title), f"<h1>{_e(title)}</h1>", f"<p class='note'>{note}</p>",
                      _table(["node", "fires on", "estimated margin effect", "exact margin effect", "density"],
                             rows, "no features"), "</body></html>"])


def feature_filename(node: str) -> str:
    """A safe file stem for a node, e.g. ``"blocks.3.hook_resid_post:17"`` -> ``"blocks.3.hook_resid_post-17"``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", node)


def write_dashboards(out_dir: str | Path, dashboards: Sequence[FeatureDashboard], *,
                     title: str = "pm_lens feature dashboards") -> Path:
    """Write ``index.html`` and, per feature, ``<stem>.html`` and ``<stem>.json`` into ``out_dir``
    (created if missing); returns the index's path. The JSON reads back with
    :meth:`FeatureDashboard.from_dict`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    links = {}
    for dashboard in dashboards:
        stem = feature_filename(dashboard.node)
        if f"{stem}.html" in links.values():
            raise ValueError(f"two dashboards write {stem}.html (node {dashboard.node!r} appears twice?)")
        write_atomic(out / f"{stem}.html", render_feature_page(dashboard, title=f"{title}: {dashboard.node}"))
        write_atomic(out / f"{stem}.json", json.dumps(dashboard.to_dict(), indent=1))
        links[dashboard.node] = f"{stem}.html"
    # The index lists every dashboard in the folder: those written before (another call) and these.
    everything = {d.node: d for d in read_dashboards(out)} | {d.node: d for d in dashboards}
    index = out / "index.html"
    write_atomic(index, render_index(list(everything.values()), title=title,
                                     links={node: f"{feature_filename(node)}.html" for node in everything}))
    return index


def read_dashboards(folder: str | Path) -> list[FeatureDashboard]:
    """The dashboards written to ``folder`` by :func:`write_dashboards` (from their JSON files)."""
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            found.append(FeatureDashboard.from_dict(json.loads(path.read_text())))
        except (KeyError, TypeError, ValueError):
            continue  # not a dashboard
    return found


def _e(text: Any) -> str:
    return html.escape(str(text))


def _g(x: float | None) -> str:
    return "not measured" if x is None else f"{x:.4g}"


def _s(x: float | None) -> str:
    """A signed number (effects), so that the sign is never missed."""
    return "not measured" if x is None else f"{x:+.4g}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _head(title: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>")


def _section(anchor: str, heading: str, note: str) -> str:
    """A heading with its reading note (``note`` is trusted HTML written in this module)."""
    return f"<h2 id='{anchor}'>{_e(heading)}</h2><p class='note'>{note}</p>"


def _table(columns: list[str], rows: list[list[Any]], empty: str) -> str:
    """A table of cells already escaped (or numbers)."""
    if not rows:
        return f"<p class='note'>({_e(empty)})</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _header(d: FeatureDashboard) -> str:
    label = f"<p>Label <b>{_e(repr(d.label))}</b>: the n-gram most characteristic of where it fires.</p>" if d.label else ""
    return (f"<p>Node <b>{_e(d.node)}</b> (feature {d.feature} of the SAE at {_e(d.hook_name)}), fires on "
            f"{_e(d.fires_on)}.</p>{label}<p>Estimated margin effect <b>{_s(d.estimated_margin_effect)}</b>, exact "
            f"margin effect <b>{_s(d.exact_margin_effect)}</b>.</p><p class='note'>Effect = change of the margin "
            "r(chosen) - r(rejected) when the feature is removed; negative means the feature raises the margin. "
            "The estimate is the attribution ranking's; the exact one is from ablation.</p>")


def _activations(h: Histogram) -> str:
    top = h.edges[-1] if h.edges else 0.0
    note = (f"The feature fires on {_pct(h.density)} of tokens ({h.n_nonzero} of {h.n_tokens}); its largest "
            f"activation is {_g(top)}. The bars count its nonzero activations by size (hover a bar for its "
            "range and count).")
    width, height, n = 600, 120, max(len(h.counts), 1)
    tallest = max(h.counts, default=0) or 1
    bars = []
    for i, count in enumerate(h.counts):
        bar = height * count / tallest
        bars.append(f"<rect x='{i * width / n:.2f}' y='{height - bar:.2f}' width='{max(width / n - 1, 0.5):.2f}' "
                    f"height='{bar:.2f}'><title>{_g(h.edges[i])} - {_g(h.edges[i + 1])}: {count}</title></rect>")
    axis = (f"<text x='0' y='{height + 14}' font-size='11'>0</text>"
            f"<text x='{width}' y='{height + 14}' font-size='11' text-anchor='end'>{_g(top)}</text>")
    svg = (f"<svg width='{width}' height='{height + 18}' viewBox='0 0 {width} {height + 18}' "
           f"xmlns='http://www.w3.org/2000/svg' role='img'>{''.join(bars)}{axis}</svg>")
    return _section("activations", "Activations", note) + svg


def _examples(d: FeatureDashboard) -> str:
    examples = [e for g in d.groups for e in g.examples]
    max_act = max((a for e in examples for a in e.acts), default=0.0)
    max_contrib = max((abs(c) for e in examples for c in e.contributions), default=0.0)
    note = ("Each example is shown twice. First line: tokens shaded orange by the feature's activation "
            "(darkest = its largest activation over these examples). Second line: tokens shaded by the "
            "feature's contribution to the reward there, green where it raises the reward, red where it "
            "lowers it (darkest = largest size on this page). Grey tokens are the prompt, underlined ones the "
            "completion; the peak token is outlined, &#9166; is a newline. Hover a token for its number.")
    parts = [_section("examples", "Examples", note)]
    for group in d.groups:
        band = (f"peak activations {_g(group.bin_min)} - {_g(group.bin_max)}" if group.bin_min >= 0
                else f"the strongest, up to {_g(group.bin_max)}")
        share = (f"; {_pct(group.bin_contains)} of its activations fall in this band"
                 if group.bin_contains >= 0 else "")
        parts.append(f"<h3>{_e(group.title)}</h3><p class='note'>{band}{share}</p>")
        parts += [_example(e, max_act, max_contrib) for e in group.examples]
        if not group.examples:
            parts.append("<p class='note'>(no examples)</p>")
    return "\n".join(parts)


def _example(example: Example, max_act: float, max_contrib: float) -> str:
    acts, contribs = [], []
    for i, (token, act, contrib) in enumerate(zip(example.tokens, example.acts, example.contributions)):
        where = "completion" if i >= example.completion_start else "prompt"
        where += " peak" if i == example.peak else ""
        text = _e(token.replace("\n", "\u23ce"))
        acts.append(_span(text, f"act {where}", _ORANGE, act, max_act, f"act {act:.3g}"))
        color = _GREEN if contrib >= 0 else _RED
        contribs.append(_span(text, f"contrib {where}", color, abs(contrib), max_contrib,
                              f"contribution {contrib:+.3g}", value=contrib))
    caption = f"pair {example.pair}, {_e(example.side)}, max {_g(example.max_act)}"
    return (f"<div class='example'><div class='note'>{caption}</div><div class='line'>{''.join(acts)}</div>"
            f"<div class='line'>{''.join(contribs)}</div></div>")


def _span(text: str, classes: str, color: str, size: float, largest: float, tip: str,
          value: float | None = None) -> str:
    """A token shaded with alpha ``size / largest`` (``text`` already escaped)."""
    alpha = min(1.0, max(0.0, size / largest)) if largest > 0 else 0.0
    value = size if value is None else value
    return (f"<span class='tok {classes}' style='background: rgba({color}, {alpha:.2f})' title='{_e(tip)}' "
            f"data-value='{value:.6g}'>{text}</span>")


def _direct(d: FeatureDashboard) -> str:
    note = ("Direct effect: what removing the feature changes through the residual stream straight to the final "
            "norm and the reward head at the last token. Indirect effect = total - direct: what goes through "
            "attention and later MLPs. Per unit: the reward change per unit of activation along the direct path. "
            "Effects are changes when the feature is removed, averaged over the pairs.")
    head = _section("direct", "Direct and total effect", note)
    r = d.direct
    if r is None:
        return head + ("<p class='note'>(not measured: no direct path; the SAE's hook does not write into the residual "
                       "stream, e.g. mlp.hook_post, so its whole effect goes through later layers)</p>")
    indirect = None if r.total_margin is None else r.total_margin - r.margin
    columns = ["per unit", "direct margin", "direct chosen", "direct rejected", "total margin", "indirect margin"]
    return head + _table(columns, [[_g(r.per_unit), _s(r.margin), _s(r.chosen), _s(r.rejected),
                                    _s(r.total_margin), _s(indirect)]], "")


def _labels(d: FeatureDashboard) -> str:
    note = ("How the feature's firing tracks labels the pairs carry: per label value, the share of pairs whose "
            "chosen (rejected) completion it fires in, and its mean largest activation there.")
    head = _section("labels", "Labels", note)
    if not d.labels:
        return head + "<p class='note'>(the pairs carry no labels)</p>"
    return head + _table(["label", "value", "pairs", "chosen rate", "rejected rate", "chosen mean peak",
                          "rejected mean peak"],
                         [[_e(r.label), _e(r.value), r.n_pairs, _pct(r.chosen_rate), _pct(r.rejected_rate),
                           _g(r.chosen_peak), _g(r.rejected_peak)] for r in d.labels], "")
