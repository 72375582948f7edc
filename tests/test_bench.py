"""`gdbdiag bench` runs end to end and its figures are sane (no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab


def test_bench_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "gdbdiag.cli", "bench", "--rounds", "1",
                        "--phase-seconds", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    modes = ("unarmed-again", "uprobe-armed", "uprobe-lean", "uprobe-full", "passive", "strace", "ebpf")
    for key in [f"overhead_ratio_{m}" for m in modes] + [
            "attach_to_armed_warm_s", "attach_to_armed_cold_s", "sticky_report_delay_ms",
            "doomed_poll_report_lead_ms"]:
        assert key in res, key
    for m in modes:
        ratio = res[f"overhead_ratio_{m}"]
        assert ratio is not None and 0.3 < ratio < 100, (m, ratio)
        assert res["latency"][m]["n"] > 0 and res["latency"][m]["rate_ratio"] > 0
        assert 0 <= res["latency"][m]["steal_pct"] < 100
    assert all(v["gets_per_s"] > 0 for v in res["throughput"].values())
    assert 0 < res["attach_to_armed_warm_s"] < 120 and 0 < res["attach_to_armed_cold_s"] < 600
    for mode in ("uprobe-armed", "uprobe-lean", "passive"):
        # the loss is noticed by glibc only after its timeout: the report follows that
        assert res["sticky_report_delay_ms"][mode] is not None and res["sticky_report_delay_ms"][mode] > 4000
        lead = res["doomed_poll_report_lead_ms"][mode]
        assert lead is not None and 0 < lead < 6000
    assert "getaddrinfo" in r.stdout and "machine:" in r.stdout


def test_latency_ratio_comes_with_the_spread_of_its_rounds():
    from gdbdiag import bench
    # 8 rounds: unarmed lookups of 2 ms, the mode's 2 ms * (1.00, 1.01, ... 1.07)
    recs, windows = [], {"unarmed": [], "uprobe-full": []}
    for r in range(8):
        for j, (m, ms) in enumerate((("unarmed", 2.0), ("uprobe-full", 2.0 * (1 + r / 100)))):
            t0 = (2 * r + j) * 10.0
            windows[m].append((t0, t0 + 10))
            recs += [{"t": t0 + k * 0.01, "seconds": ms / 1000} for k in range(100)]
    busy = {m: [1.0] * 8 for m in windows}
    out = bench._latency_figures(recs, windows, busy, ("unarmed", "uprobe-full"))
    lo, hi = out["uprobe-full"]["ratio_iqr"]
    assert lo < out["uprobe-full"]["ratio"] < hi
    assert (round(lo, 2), round(hi, 2)) == (1.01, 1.06)
    assert out["unarmed"]["ratio_iqr"] == [1.0, 1.0]
    assert "per-round IQR" in bench.render({"latency": out, "machine": bench.machine()})


def test_floor_has_full_modes_probes_and_programs_that_do_nothing(lab_factory):
    """uprobe-floor (the mechanism's own cost): the same probes as --full, at the same
    places, all attached, writing nothing while the target resolves back to back; its code
    is untouched either way."""
    import time
    from gdbdiag import bench
    from gdbdiag.codecheck import diff_code
    lab = lab_factory(release="bullseye", workload="resolver", names=("keydb-0.keydb",),
                      interval=0.0, fault="none", records=bench.RECORDS)
    seen = {}
    for mode in ("uprobe-floor", "uprobe-full"):
        tool = bench.Tool(mode, lab.pid)
        tool.start()
        try:
            time.sleep(1.5)
            owner = tool.uprobe.owner
            seen[mode] = ([(p.kind, p.file, p.offset) for p in owner.probes],
                          len(owner.fds), tool.uprobe.records_seen)
        finally:
            tool.stop()
    floor, full = seen["uprobe-floor"], seen["uprobe-full"]
    assert floor[0] == full[0] and floor[1] == full[1] == len(full[0])   # all attached
    assert {k for k, _, _ in floor[0]} == {"uprobe", "sys_enter", "sys_exit"}
    assert floor[2] == 0 and full[2] > 0
    assert lab.alive() and diff_code(lab.pid, ("libc", "libresolv")) == []
