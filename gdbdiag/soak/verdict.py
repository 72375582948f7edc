"""The soak's verdicts: are RSS and CPU flat, is the final report complete, and the
summary printed at the end."""
from __future__ import annotations

import statistics

from .config import CPU_FLAT_POINTS, CPU_FLAT_SHARE, RSS_FLAT_KB, STICKY, VERDICTS
from .meter import Meter, Sample

def summarize(samples: list[Sample]) -> dict:
    """RSS first/last/max and its drift (least-squares slope, kB per hour), CPU mean/max
    and slope, and "flat" by the criterion of RSS_FLAT_KB / CPU_FLAT_*."""
    if not samples:
        return {"samples": 0, "flat": None}
    rss, mins = [s.rss_kb for s in samples], [s.minute for s in samples]
    cpu = [s.cpu_pct for s in samples]
    out = {"samples": len(samples), "rss_first_kb": rss[0], "rss_last_kb": rss[-1],
           "rss_max_kb": max(rss), "hwm_last_kb": samples[-1].hwm_kb,
           "rss_growth_after_first_kb": max(rss) - rss[0],
           "cpu_mean_pct": round(statistics.fmean(cpu), 2), "cpu_max_pct": max(cpu),
           "lookups_per_s_mean": round(statistics.fmean(s.lookups_per_s for s in samples), 1),
           "lookups_every_interval": all(s.lookups > 0 for s in samples),
           "lookup_errors": sum(s.errors for s in samples)}
    later = samples[1:]                     # interval 1 includes the arming
    # the drift of what follows interval 1 (the arming, the report's buffer filling)
    out["rss_drift_kb_per_h"] = _slope_per_h(mins[1:], rss[1:]) if len(later) >= 2 else \
        _slope_per_h(mins, rss)
    out["cpu_slope_pct_per_h"] = _slope_per_h([s.minute for s in later], [s.cpu_pct for s in later])
    k = max(1, len(later) // 3)
    first = statistics.fmean(s.cpu_pct for s in later[:k]) if later else None
    last = statistics.fmean(s.cpu_pct for s in later[-k:]) if later else None
    out["cpu_first_third_pct"] = round(first, 2) if first is not None else None
    out["cpu_last_third_pct"] = round(last, 2) if last is not None else None
    out["rss_flat"] = out["rss_growth_after_first_kb"] < RSS_FLAT_KB
    out["cpu_flat"] = None if first is None else \
        abs(last - first) <= max(CPU_FLAT_POINTS, CPU_FLAT_SHARE * first)
    out["flat"] = bool(out["rss_flat"] and out["cpu_flat"])
    return out


def _slope_per_h(xs_min: list[float], ys: list[float]) -> float | None:
    if len(xs_min) < 2 or len(set(xs_min)) < 2:
        return None
    return round(statistics.linear_regression(xs_min, ys).slope * 60, 1)


def check_report(rep: dict, meter: Meter, injected_at: float) -> list[dict]:
    """Is the final report complete? One entry per check: name, ok, detail."""
    checks = []
    add = lambda name, ok, detail: checks.append({"check": name, "ok": bool(ok), "detail": detail})  # noqa: E731
    v, g, run = rep.get("verdict") or {}, rep.get("glibc") or {}, rep.get("run") or {}
    add("verdict", v.get("code") in VERDICTS, f"{v.get('code')}: {v.get('summary')}")
    add("glibc facts", g.get("version") and g.get("distro_package") and g.get("sticky_field")
        and g.get("affected_30081") is not None,
        f"glibc {g.get('version')} ({g.get('distro_package')}), affected_30081 "
        f"{g.get('affected_30081')}, sticky bit in {g.get('sticky_field')}")
    sticky = [t for t in rep.get("threads", []) if t.get("sticky")]
    mine = [t for t in sticky if t.get("lwp_target") == meter.sticky_tid]
    lwp = mine[0]["lwp"] if mine else None
    add("sticky thread", len(sticky) == 1 and mine and mine[0].get("cause"),
        f"{len(sticky)} sticky thread(s): " + "; ".join(
            f"LWP {t['lwp']} ({t.get('name')}, {t.get('lwp_target')} in the container): "
            f"{t.get('cause')}" for t in sticky))
    eng = [e for e in rep.get("events", []) if e["kind"] == "sticky_engaged" and e["lwp"] == lwp]
    e = eng[0] if eng else {}
    add("sticky_engaged", e.get("how") == "flag_write" and e.get("t", 0) >= injected_at
        and str(e.get("lost_qname") or "").startswith(STICKY),
        f"{len(eng)} finding(s); seen {e.get('how')} {e.get('t', 0) - injected_at:+.1f} s after "
        f"the injection, lost {e.get('lost_qtype')} {e.get('lost_qname')}" if e else "none")
    in_report = sum(1 for x in rep.get("events", []) if x["kind"] == "gai_enter" and x["lwp"] == lwp)
    n, t1, t2 = meter.gai.get(lwp, [0, 0.0, 0.0])
    logged = sum(1 for t in meter.sticky_times if t1 - 0.05 <= t <= t2)
    add("lookups counted", in_report > 0 and n > 0 and abs(logged - n) <= 2,
        f"the stream has {n} getaddrinfo entries of the sticky thread, the workload logged "
        f"{logged} lookups by it over the same span; the report keeps {in_report} (its last "
        f"observations)")
    # records lost to a full ring are a figure of the soak (the 'lost' column), not a gap
    # in the report's structure: the stream-vs-workload count above shows their effect
    add("run", run.get("ended_by") == "duration" and not run.get("bad_records"),
        f"ended by {run.get('ended_by')}, {run.get('records')} records, {run.get('lost_records')} "
        f"lost, {run.get('bad_records')} bad")
    return checks


def render(res: dict) -> str:
    s, out = res.get("summary") or {}, []
    ru = res.get("runner") or {}
    out.append("== the runner's own output (its report):")
    out += ["   | " + line for line in (res.get("runner_output") or "").rstrip().splitlines()]
    out.append(f"== soak summary ({s.get('samples', 0)} intervals of {res['interval_s']:g} s)")
    if s.get("samples"):
        mb = lambda kb: f"{kb / 1024:.1f} MB"  # noqa: E731
        out.append(f"   runner RSS: first {mb(s['rss_first_kb'])} (after interval 1), last "
                   f"{mb(s['rss_last_kb'])}, max {mb(s['rss_max_kb'])}; growth after interval 1 "
                   f"{mb(s['rss_growth_after_first_kb'])}; drift (least squares, after interval 1) "
                   f"{s['rss_drift_kb_per_h']} kB/h; VmHWM {mb(s['hwm_last_kb'])}"
                   + (f"; peak at exit (ru_maxrss) {mb(ru['maxrss_kb'])}" if "maxrss_kb" in ru else ""))
        out.append(f"   runner CPU (% of one core): mean {s['cpu_mean_pct']}, max {s['cpu_max_pct']}; "
                   f"first third {s['cpu_first_third_pct']}, last third {s['cpu_last_third_pct']} "
                   f"(interval 1, the arming, left out); slope {s['cpu_slope_pct_per_h']} points/h"
                   + (f"; {ru['cpu_s']} s in all" if "cpu_s" in ru else ""))
        out.append(f"   workload: {s['lookups_per_s_mean']} lookups/s on average (its own log), "
                   f"lookups in every interval: {'yes' if s['lookups_every_interval'] else 'NO'}, "
                   f"{s['lookup_errors']} failed")
        out.append(f"   event stream (--record): {res.get('record_bytes', 0) / 1e6:.1f} MB")
        last = res["samples"][-1] if res.get("samples") else {}
        out.append(f"   records the probes could not write (the runner's lost_records): "
                   f"{res.get('lost_records_at_exit', last.get('lost_records'))} in the run "
                   f"(column 'lost': the count so far at each interval)")
        out.append(f"   flat: {'yes' if s['flat'] else 'NO'} — criterion: RSS never more than "
                   f"{RSS_FLAT_KB // 1024} MB above its value after interval 1 "
                   f"({'met' if s['rss_flat'] else 'not met'}), and the CPU % of the last third "
                   f"of the intervals within max({CPU_FLAT_POINTS:g} point, {CPU_FLAT_SHARE:.0%}) "
                   f"of the first third's ({'met' if s['cpu_flat'] else 'not met'})")
    out.append(f"== the final report ({res.get('report')}), runner exit code {ru.get('code')}")
    for c in res.get("checks", []):
        out.append(f"   {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}")
    out.append(f"   report complete: {'yes' if res.get('report_complete') else 'NO'}")
    return "\n".join(out)
