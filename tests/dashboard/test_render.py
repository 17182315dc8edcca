"""Feature dashboard pages: every number shown, tokens shaded right, text escaped, files written,
and (where Chromium is installed) the page painted by a real browser."""

import json
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pm_lens.dashboard.data import (
    CoFiring,
    Datapoint,
    DirectEffect,
    Example,
    ExampleGroup,
    FeatureDashboard,
    Histogram,
    LabelRow,
)
from pm_lens.dashboard.render import feature_filename, render_feature_page, render_index, write_dashboards

NODE = "blocks.3.hook_resid_post:17"
ORANGE, GREEN, RED = "255, 120, 0", "0, 170, 0", "220, 0, 0"


def _examples() -> list[Example]:
    return [
        # the strongest example: its peak (2.0) is the largest activation, 0.0456 the largest |contribution|
        Example(pair=3, side="chosen", tokens=["User", ":", " hi", "\n", "<script>", " great"],
                acts=[0.0, 0.0, 0.5, 0.0, 2.0, 1.0], contributions=[0.0, 0.0, 0.0114, 0.0, 0.0456, -0.0123],
                peak=4, completion_start=3),
        Example(pair=7, side="rejected", tokens=["Sure", " thing", "!"], acts=[1.5, 0.0, 0.75],
                contributions=[-0.0342, 0.0, 0.02], peak=0, completion_start=0),
        Example(pair=9, side="chosen", tokens=["a", " b"], acts=[0.625, 0.3], contributions=[0.005, 0.0],
                peak=0, completion_start=5),
    ]


def _dashboard(full: bool = True) -> FeatureDashboard:
    ex = _examples()
    groups = [ExampleGroup("Top activations", -1.0, 2.0, -1.0, ex[:2]),
              ExampleGroup("Interval 0.5 - 1", 0.5, 1.0, 0.25, ex[2:])]
    datapoints = [Datapoint(3, 1.25, 0.75, 0.5, 0.625, -0.625, False),
                  Datapoint(7, 0.3, -0.2, 0.1, 0.15, -0.55, True)]
    return FeatureDashboard(
        node=NODE, hook_name="blocks.3.hook_resid_post", feature=17, fires_on="' great' ' hi'",
        estimated_margin_effect=-0.0413 if full else None, exact_margin_effect=-0.0512 if full else None,
        histogram=Histogram(edges=[0.0, 0.5, 1.0, 1.5, 2.0], counts=[3, 2, 1, 1], n_tokens=40, n_nonzero=7),
        groups=groups, datapoints=datapoints if full else [],
        direct=DirectEffect(per_unit=0.0321, chosen=-0.0123, rejected=0.0045, margin=-0.0168,
                            total_margin=-0.0512) if full else None,
        cofiring=[CoFiring("blocks.3.hook_resid_post:42", 5, 0.3125, 0.7143)],
        labels=[LabelRow("topic", "math", 12, 0.75, 0.25, 1.375, 0.4375)] if full else [],
        settings={"seed": 0})


class _Spans(HTMLParser):
    """The token spans of a page (or of a browser's DOM dump): their attributes and text."""

    def __init__(self, page: str):
        super().__init__()
        self.spans, self._open = [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in attrs.get("class", "").split():
            self._open = {**attrs, "text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


def _rgba(span: dict) -> tuple[str, str]:
    inside = span["style"].split("rgba(")[1].split(")")[0]
    color, alpha = inside.rsplit(",", 1)
    return color.strip(), alpha.strip()


def _kind(spans: list[dict], kind: str) -> list[dict]:
    return [s for s in spans if kind in s["class"].split()]


def test_every_number_is_on_the_page():
    d = _dashboard()
    page = render_feature_page(d)
    expected = ["-0.0413", "-0.0512", "17.50%", "7 of 40", "0 - 0.5: 3", "0.5 - 1: 2", "1 - 1.5: 1", "1.5 - 2: 1",
                "25.00%", "pair 3, chosen, max 2", "pair 7, rejected, max 1.5", "pair 9, chosen, max 0.625",
                "1.25 &rarr; 0.75", "0.5 &rarr; 0.625", "-0.625", "0.3 &rarr; -0.2", "0.1 &rarr; 0.15", "-0.55",
                "0.0321", "-0.0168", "-0.0123", "+0.0045", "-0.0344",  # indirect = -0.0512 - (-0.0168)
                "blocks.3.hook_resid_post:42", "<td>5</td>", "0.3125", "0.7143",
                "<td>topic</td>", "<td>math</td>", "<td>12</td>", "75.00%", "<td>1.375</td>", "0.4375"]
    for text in expected:
        assert text in page, text
    assert page.count("<td>yes</td>") == 1 and page.count("<td>no</td>") == 1  # only pair 7 flips
    assert page.count("<rect ") == len(d.histogram.counts)
    positions = [page.index(f"<h2 id='{anchor}'>") for anchor in
                 ("activations", "examples", "datapoints", "direct", "cofiring", "labels")]
    assert positions == sorted(positions)
    assert page.index("href='index.html'") < positions[0]


def test_token_spans_carry_values_and_shades():
    examples = _examples()
    spans = _Spans(render_feature_page(_dashboard())).spans
    acts, contribs = _kind(spans, "act"), _kind(spans, "contrib")
    assert len(acts) == len(contribs) == sum(len(e.tokens) for e in examples)
    assert [s["data-value"] for s in acts] == [f"{a:.6g}" for e in examples for a in e.acts]
    assert [float(s["data-value"]) for s in contribs] == [c for e in examples for c in e.contributions]
    peak = acts[4]  # the first example's peak: the largest activation over all examples
    assert "peak" in peak["class"] and _rgba(peak) == (ORANGE, "1.00") and peak["title"] == "act 2"
    assert _rgba(acts[2])[1] == "0.25" and _rgba(acts[6])[1] == "0.75"  # 0.5 / 2 and 1.5 / 2
    assert _rgba(contribs[4]) == (GREEN, "1.00") and contribs[4]["title"] == "contribution +0.0456"
    assert _rgba(contribs[5]) == (RED, "0.27") and contribs[5]["title"] == "contribution -0.0123"
    assert _rgba(contribs[6]) == (RED, "0.75")  # -0.0342 / 0.0456
    assert [("prompt" in s["class"]) for s in acts[:6]] == [True] * 3 + [False] * 3
    assert all("completion" in s["class"] for s in acts[6:9]) and all("prompt" in s["class"] for s in acts[9:])
    assert acts[3]["text"] == "\u23ce" and acts[4]["text"] == "<script>"  # the parser unescapes: the page escaped it


def test_text_is_escaped():
    d = _dashboard()
    page = render_feature_page(d, title="A & <B>")
    assert "<script>" not in page and "&lt;script&gt;" in page and "A &amp; &lt;B&gt;" in page


def test_missing_parts_say_so():
    page = render_feature_page(_dashboard(full=False))
    assert "not measured" in page and "no pairs measured" in page and "carry no labels" in page
    assert "<h2 id='labels'>" in page and "<td>yes</td>" not in page


def test_feature_filename_is_safe():
    assert feature_filename(NODE) == "blocks.3.hook_resid_post-17"
    assert feature_filename("a/b c:<1>") == "a-b-c--1-"


def test_write_dashboards_round_trips(tmp_path):
    dashboards = [_dashboard(), _dashboard(full=False)]
    dashboards[1] = FeatureDashboard.from_dict({**dashboards[1].to_dict(), "node": "blocks.3.hook_resid_post:42",
                                                "feature": 42})
    index = write_dashboards(tmp_path / "out", dashboards)
    assert index == tmp_path / "out" / "index.html"
    for d in dashboards:
        stem = feature_filename(d.node)
        assert (index.parent / f"{stem}.html").is_file()
        assert FeatureDashboard.from_dict(json.loads((index.parent / f"{stem}.json").read_text())) == d
    page = index.read_text()
    hrefs = [part.split("'")[0] for part in page.split("href='")[1:]]
    assert len(hrefs) == 2 and all((index.parent / h).is_file() for h in hrefs)
    assert "17.50%" in page and "-0.0413" in page and "not measured" in page
    with pytest.raises(ValueError, match="twice"):
        write_dashboards(tmp_path / "dup", [dashboards[0], dashboards[0]])


def test_index_without_link_shows_plain_node():
    page = render_index([_dashboard()], title="t", links={})
    assert NODE in page and "href" not in page


# --- a real browser ---------------------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chromium-headless-shell"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found; install it (apt-get install chromium) to check the page in a real browser")


def _run_chromium(binary: str, profile: Path, *args: str) -> str:
    done = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", *args], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _png_pixels(png: bytes) -> np.ndarray:
    """The pixels of an 8-bit, non-interlaced RGB or RGBA PNG, ``(height, width, channels)``."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", png[16:29])
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp, pos, idat = 3 if color == 2 else 4, 8, b""
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        idat += png[pos + 8:pos + 8 + length] if kind == b"IDAT" else b""
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prior = [], np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1)
        if kind == 0:
            line = line.copy()
        elif kind == 1:  # sub: a running sum along the row, per channel (uint8 wraps as PNG does)
            line = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # up
            line = line + prior
        else:  # average and Paeth read the byte just decoded to their left: one byte at a time
            line = _unfilter_slowly(kind, bytearray(line), bytes(prior), bpp)
        rows.append(line)
        prior = line
    return np.stack(rows).reshape(height, width, bpp)[..., :3].astype(int)


def _unfilter_slowly(kind: int, line: bytearray, prior: bytes, bpp: int) -> np.ndarray:
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up, corner = prior[i], (prior[i - bpp] if i >= bpp else 0)
        if kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 255
        else:
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
    return np.frombuffer(bytes(line), dtype=np.uint8)


def test_page_in_a_real_browser(tmp_path):
    binary = _chromium()
    examples = _examples()
    page = tmp_path / "feature.html"
    page.write_text(render_feature_page(_dashboard()), encoding="utf-8")
    dom = _run_chromium(binary, tmp_path / "profile", "--dump-dom", page.as_uri())
    spans = _Spans(dom).spans
    assert len(spans) == 2 * sum(len(e.tokens) for e in examples)
    assert [s["data-value"] for s in _kind(spans, "act")] == [f"{a:.6g}" for e in examples for a in e.acts]
    for text in ("-0.0413", "-0.0512", "17.50%", "-0.0344", "0.4375"):
        assert text in dom, text

    shot = tmp_path / "feature.png"
    _run_chromium(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2000", page.as_uri())
    png = shot.read_bytes()
    assert struct.unpack(">II", png[16:24])[0] == 1400
    pixels = _png_pixels(png)
    r, g, b = pixels.transpose(2, 0, 1)
    # the peak tokens' full shades, painted exactly (a decoding slip would not give these)
    for colour in (ORANGE, GREEN):
        assert (pixels == [int(c) for c in colour.split(",")]).all(axis=-1).sum() > 50, colour
    orange = int(((r > 200) & (g > 100) & (g < 200) & (b < 100)).sum())
    # shades of the span colours over white: the histogram bars are blue, outlines and text dark or grey
    green = int(((g > 150) & (r < 140) & (abs(r - b) < 25)).sum())
    red = int(((r > 200) & (g < 140) & (abs(g - b) < 25)).sum())
    print(f"pixels: orange {orange}, green {green}, red {red}")
    assert orange > 200 and green > 100 and red > 100, (orange, green, red)
