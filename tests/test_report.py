"""The HTML report: sections present, text escaped, tokens shaded by activation."""

import pandas as pd
import torch

from pm_lens import Node
from pm_lens.attribution.fidelity import FidelityCard
from pm_lens.report import render_report, write_report
from pm_lens.saes.contexts import Context, FeatureContexts


def _card():
    return FidelityCard(settings={"method": "atp", "ig_steps": None, "target": "margin", "baseline": "zero", "positions": "all"},
                        n_top=2, n_random=1, k=2, pearson=0.9, spearman=0.8, pearson_top=1.0, spearman_top=1.0,
                        sign_agreement=1.0, topk_recall=1.0, median_relative_error=0.1, missed_threshold=0.5,
                        missed_in_sample=0, missed_estimated=0.0, n_outside_top=7, completeness=None)


def test_report_escapes_text_and_shades_tokens(tmp_path):
    features = pd.DataFrame({"hook_name": ["blocks.0.hook_resid_post"] * 2, "feature": [3, 5], "direction": ["raises", "lowers"],
                             "fires_on": ["'<script>'", "'x'"]})
    context = Context(pair=0, side="chosen", tokens=["Hi", "<script>", "\n"], acts=[0.0, 2.0, 1.0], peak=1, completion_start=1)
    node = Node("blocks.0.hook_resid_post", 3)
    contexts = {node: FeatureContexts(node, [context], [("<script>", 2.0)], 0.1, torch.zeros(1, 2), 0.5)}
    page = render_report(title="A & B", settings={"seed": 0}, features=features, card=_card(), contexts=contexts,
                         tables={"Extra": pd.DataFrame({"x": [1]})}, notes={"Fidelity": "a <note>"})
    assert "<script>" not in page and "&lt;script&gt;" in page and "A &amp; B" in page and "a &lt;note&gt;" in page
    for heading in ("Features that raise reward", "Features that lower reward", "Fidelity", "Extra", "Where the features fire"):
        assert f"<h2>{heading}</h2>" in page
    assert "rgba(255, 120, 0, 1.00)" in page and "rgba(255, 120, 0, 0.50)" in page  # peak and half-peak shades
    assert "blocks.0.hook_resid_post:3" in page  # the node's one spelling
    assert "class='prompt'" in page and "class='completion peak'" in page and "⏎" in page
    write_report(tmp_path / "r.html", title="t", settings={}, features=features, card=_card(), contexts=contexts)
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


def test_report_of_any_run_takes_attributes_top_features(tmp_path, tokenizer):
    """write_report on attribute(...).top_features() (no 'direction' column): features are split
    by the sign of their removal effect, and the headings say what the sign means."""
    from pm_lens import RewardModel, attribute
    from pm_lens.attribution.fidelity import check_fidelity
    from pm_lens.data import encode_pairs
    from pm_lens.testing import sparse_sae_for, tiny_hf_reward_model
    from tests.attribution.conftest import PAIRS

    rm = RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=3), tokenizer)
    tokens = encode_pairs(tokenizer, PAIRS, max_len=128).chosen.tokens
    sae = sparse_sae_for(rm, "blocks.1.hook_resid_post", tokens, d_sae=64, fire_rate=0.2)
    result = attribute(rm, PAIRS, saes=[sae], progress=False)
    top = result.top_features(6)
    card = check_fidelity(rm, result, top_k=5, n_random=3, progress=False)
    write_report(tmp_path / "r.html", title="run", settings={}, features=top, card=card, contexts={})
    page = (tmp_path / "r.html").read_text()
    assert "Features that raise reward" in page and "removing one of these lowers reward (effect &lt; 0)" in page
    raising = top[top.effect < 0]
    for row in raising.itertuples():
        assert row.node in page
    raising_words = render_report(title="t", settings={}, features=result.top_features(3, direction="raising")
                                  .assign(direction="raising"), card=card, contexts={})
    assert "Features that raise reward" in raising_words


def _wide_report(**extra):
    """A report shaped like the demo's: many columns, long labels and token lists, a finding."""
    from pm_lens.report import Finding

    hooks = ["blocks.15.hook_resid_post", "blocks.22.hook_resid_post"]
    features = pd.DataFrame({
        "attribute": ["closer", "closer", "url"], "rank": [1, 2, 1], "hook_name": [hooks[0], hooks[1], hooks[0]],
        "feature": [1017, 2047, 1017], "direction": ["raises", "raises", "lowers"],
        "label": ["' You are most welcome'", "'<|im_end|>\\n'", "'https://www.ducksters'"],
        "estimated_margin_effect": [-1.23456, -0.5, 0.75], "exact_margin_effect": [-1.1, -0.45, 0.8],
        "fires_in": ["chosen", "both", "rejected"], "exact_reward_effect": [-1.0, -0.3, 0.9],
        "fires_on": ["' welcome' '!' ' pleasure'", "'\\n' '.' '<|im_end|>'", "'https' '://' 'www'"],
        "at_last_token": [0.1, 3.2, 0.0], "tracks_attribute": ["closer", "idk", "url"], "correlation": [0.9, 0.2, 0.8],
        "sign_agreement": [1.0, 0.83, 1.0], "also_top_for": ["url", "", "closer"],
        "exact_chosen_effect": [-1.0, -0.3, 0.0], "exact_rejected_effect": [0.0, 0.1, 0.9]})
    node = Node(hooks[0], 1017)
    tokens = ["Paris", " is", " the", " capital", ".", " You", " are", " most", " welcome", "!", "<|im_end|>", "\n"] * 2
    context = Context(pair=0, side="chosen", tokens=tokens, acts=[0.0] * 8 + [3.0] + [0.0] * 15, peak=8,
                      completion_start=0)
    contexts = {node: FeatureContexts(node, [context], [(" welcome", 3.0)], 0.1, torch.zeros(1, 2), 0.5, label="' welcome'")}
    finding = Finding(title="closer: planted to raise reward", verdict="removes 91% of its margin",
                      features=features[features.attribute == "closer"][["rank", "hook_name", "feature", "label"]], ok=True)
    settings = {"settings": {"a_long_setting_name": "x" * 300}, "versions": {"torch": "2.13.0+cpu"}}
    return render_report(title="demo", settings=settings, features=features, card=_card(), contexts=contexts,
                         findings=[finding], lead="What we found, in words.", **extra)


def test_report_leads_with_the_findings_and_ends_with_the_settings():
    page = _wide_report(feature_columns=["attribute", "rank", "label", "exact_margin_effect"])
    headings = [part.split("</h2>")[0] for part in page.split("<h2>")[1:]]
    assert headings[0] == "Findings" and headings[-1] == "Settings"
    assert page.index("What we found, in words.") < page.index("<h2>Findings</h2>")
    finding = page[page.index("<div class='finding ok'>"):page.index("<h2>Features that raise reward</h2>")]
    assert "removes 91% of its margin" in finding and "blocks.15.hook_resid_post:1017" in finding
    assert "class='completion peak'" in finding and "rgba(255, 120, 0, 1.00)" in finding  # the highlighted firing
    assert "&#x27; You are most welcome&#x27;" in page or "' You are most welcome'" in page
    tables = page[page.index("<h2>Features that raise reward</h2>"):page.index("<h2>Fidelity</h2>")]
    assert "exact_margin_effect" in tables and "fires_on" not in tables and "sign_agreement" not in tables
    assert page.index("a_long_setting_name") > page.index("<h2>Settings</h2>")


def test_report_fits_a_laptop_window_in_a_real_browser(tmp_path):
    """At 1400 px no part of the page (tables included) is wider than the window: no column hides
    behind a horizontal scrollbar. Measured by Chromium itself (scrollWidth), all columns shown."""
    from tests.dashboard.test_render import _chromium, _run_chromium

    binary = _chromium()
    page = _wide_report().replace("</body>", "<script>document.title = 'width=' + "
                                  "document.documentElement.scrollWidth;</script></body>")
    path = tmp_path / "report.html"
    path.write_text(page)
    dom = _run_chromium(binary, tmp_path / "profile", "--window-size=1400,900", "--dump-dom", path.as_uri())
    width = int(dom.split("<title>width=")[1].split("<")[0])
    assert 0 < width <= 1400, width
