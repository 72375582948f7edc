"""`gdbdiag bench --soak`: a short soak runs end to end on a lab resolver, prints one line
per interval, checks the final report and tears the lab down (no timing is asserted);
the summary's "flat" criterion and the log tail on synthetic input."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from gdbdiag import soak
from gdbdiag.lab import container

SAMPLE_RE = re.compile(r"^\s+\d+\.\d\d\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+\s+[\d.]+\s+\d+\s+\d+\s+\d+\s+[\d.]+\s+(\d+|\?)$")
CHECKS = {"verdict", "glibc facts", "sticky thread", "sticky_engaged", "lookups counted", "run"}


def _sample(minute, rss_mb, cpu):
    return soak.Sample(minute=minute, rss_kb=int(rss_mb * 1024), hwm_kb=int(rss_mb * 1024) + 10,
                       cpu_pct=cpu, lookups=500, lookups_per_s=50.0, sticky_lookups=100,
                       errors=0, recorded_lookups=100, record_bytes=0)


def test_summary_flat_criterion():
    flat = soak.summarize([_sample(m, 60 + (m % 2) * 0.5, 3.0 + (m % 3) * 0.1) for m in range(1, 11)])
    assert flat["flat"] and flat["rss_flat"] and flat["cpu_flat"]
    assert abs(flat["rss_drift_kb_per_h"]) < 5 * 1024
    leak = soak.summarize([_sample(m, 60 + m, 3.0) for m in range(1, 11)])
    assert not leak["rss_flat"] and not leak["flat"] and leak["rss_drift_kb_per_h"] == 60 * 1024
    busier = soak.summarize([_sample(m, 60, 3.0 * m) for m in range(1, 11)])
    assert busier["rss_flat"] and not busier["cpu_flat"] and not busier["flat"]
    assert soak.summarize([])["flat"] is None


def test_log_tail_returns_complete_lines_once(tmp_path):
    f = tmp_path / "log"
    tail = soak.LogTail(f)
    assert tail.lines() == []
    f.write_text('{"a": 1}\n{"b"')
    assert tail.lines() == ['{"a": 1}']
    with open(f, "a") as fh:
        fh.write(': 2}\n')
    assert tail.lines() == ['{"b": 2}'] and tail.lines() == []


@pytest.mark.lab
def test_soak_runs_checks_the_report_and_tears_down(tmp_path):
    out = tmp_path / "soak.json"
    p = subprocess.Popen([sys.executable, "-m", "gdbdiag.cli", "bench", "--soak", "1.5",
                          "--soak-interval", "20", "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    name = f"soak-{p.pid % 100000}"
    try:
        text, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGINT)            # the soak stops its runner, tears down
        text, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        container.down(name, quiet=True)         # whatever happened above
    assert p.returncode == 0, text[-4000:]
    res = json.loads(out.read_text())["soak"]
    lines = [l for l in text.splitlines() if SAMPLE_RE.match(l)]
    # one line per interval: 90 s of run, one every 20 s
    assert len(lines) == len(res["samples"]) >= 4, text[-4000:]
    for s in res["samples"]:
        assert s["rss_kb"] > 0 and s["hwm_kb"] >= s["rss_kb"] and s["cpu_pct"] >= 0
        assert s["lookups"] > 0 and s["errors"] == 0
        assert s["lost_records"] is not None           # the runner's loss counter was found
    assert res["samples"][-1]["record_bytes"] > 0 and res["baseline_lookups_per_s"] > 0
    assert res["samples"][-1]["sticky_lookups"] > 0 and res["samples"][-1]["recorded_lookups"] > 0
    summary = res["summary"]
    for k in ("rss_first_kb", "rss_last_kb", "rss_max_kb", "rss_drift_kb_per_h", "cpu_mean_pct",
              "cpu_max_pct", "rss_flat", "cpu_flat", "flat"):
        assert k in summary, k
    assert summary["lookups_every_interval"] and "flat:" in text and "criterion" in text
    assert {c["check"] for c in res["checks"]} == CHECKS
    assert res["report_complete"] and all(c["ok"] for c in res["checks"]), res["checks"]
    assert "report complete: yes" in text and "STICKY" in text
    assert res["runner"]["code"] == 0 and res["runner"]["maxrss_kb"] > 0
    assert res["lab"] == name and res["lab_torn_down"] and f"lab {name} torn down" in text
    assert container.leftovers(name) == [] and name not in {l.name for l in container.list_labs()}
    assert not os.path.exists(os.path.join(res["workdir"], "stream.jsonl"))  # removed, size kept
    shutil.rmtree(res["workdir"])
