"""The timeline: built from a recorded lab stream, rendered by headless Chromium."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from PIL import Image

from gdbdiag.core import report as R
from gdbdiag.core.detector import Detector
from gdbdiag.core.events import OBSERVATIONS, load_stream
from gdbdiag.timeline import build, svg, terminal, write_html

STREAMS = Path(__file__).parent / "data" / "streams"


def report_from(stem: str) -> dict:
    meta = json.loads((STREAMS / f"{stem}.json").read_text())
    det = Detector(**meta["detector"])
    obs = []
    with open(STREAMS / f"{stem}.jsonl") as fh:
        for ev in load_stream(fh):
            if ev.kind in OBSERVATIONS:
                obs.append(ev)
                det.feed(ev)
    return R.build(det, {"pid": 1, "exe": "redis-server"}, meta["build"], {}, obs)


def test_model_tells_the_story():
    rep = report_from("bullseye-redis-stalling")
    lanes, t0, t1 = build(rep)
    assert len(lanes) == 1
    kinds = [m.kind for m in lanes[0].marks]
    assert "query_parallel" in kinds and "query_serial" in kinds
    assert "lost" in kinds and "sticky" in kinds and "stall" in kinds
    # parallel before the switch, serial after
    st = lanes[0].sticky_at
    assert all(m.t <= st for m in lanes[0].marks if m.kind == "query_parallel")
    assert any(m.t > st for m in lanes[0].marks if m.kind == "query_serial")
    assert all(4.5 <= m.dur <= 5.5 for m in lanes[0].marks if m.kind == "stall")
    text = terminal(rep)
    assert "█" in text and "S" in text and "‖" in text
    assert svg(rep).startswith("<svg") and "sticky serial mode" in svg(rep)


def test_html_renders_in_headless_chromium(tmp_path):
    rep = report_from("bullseye-redis-stalling")
    page = tmp_path / "timeline.html"
    write_html(rep, str(page))
    html = page.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "<script" not in html
    png = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,600",
                    f"--screenshot={png}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = Image.open(png).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50          # not a blank page
    # the stall bars are there: plenty of the stall red
    red = sum(n for n, (r, g, b) in colors if r > 190 and g < 100 and b < 100)
    assert red > 2000
