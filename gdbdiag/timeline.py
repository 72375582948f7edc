"""The story at a glance: per-thread resolver timeline, in the terminal and as HTML/SVG.

Input is a report (schema gdbdiag.report/1): its events carry the observations
(send_dg entries, sends, answers, polls) and the findings (lost answers, the switch to
sticky serial mode, doomed polls and stalls). Pure: no gdb, no network; the HTML page is
self-contained (inline SVG and CSS, no scripts, no fetches).
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

@dataclass
class Mark:
    t: float
    kind: str            # query_parallel, query_serial, answer, lost, sticky, stall, doomed
    label: str
    dur: float = 0.0
    rcode: str | None = None
    qtype: str | None = None


@dataclass
class Lane:
    lwp: int
    name: str | None
    marks: list[Mark] = field(default_factory=list)
    sticky_at: float | None = None


def build(report: dict) -> tuple[list[Lane], float, float]:
    """Lanes (one per thread that used the resolver), t_min, t_max."""
    lanes: dict[int, Lane] = {}
    ids: dict[tuple[int, int], tuple[str, str]] = {}      # (lwp, dns id) -> (qtype, qname)
    pending_send: dict[int, dict] = {}
    names = {t["lwp"]: t.get("name") for t in report.get("threads", [])}

    def lane(lwp):
        if lwp not in lanes:
            lanes[lwp] = Lane(lwp=lwp, name=names.get(lwp))
        return lanes[lwp]

    for e in report.get("events", []):
        k, lwp, t = e["kind"], e["lwp"], e["t"]
        if k == "send_dg_enter":
            for q in e.get("queries") or []:
                if q and q.get("id") is not None:
                    ids[(lwp, q["id"])] = (q.get("qtype"), q.get("qname"))
            pending_send[lwp] = e
        elif k == "sendmmsg_return" and (e.get("n") or 0) >= 2:
            ent = pending_send.get(lwp, {})
            qn = ent.get("qname") or "?"
            lane(lwp).marks.append(Mark(t, "query_parallel", f"A+AAAA {qn} (sendmmsg, parallel)",
                                        qtype="A+AAAA"))
        elif k == "send_return" and (e.get("n") or 0) > 0:
            qt, qn = ids.get((lwp, e.get("id")), ("?", "?"))
            lane(lwp).marks.append(Mark(t, "query_serial", f"{qt} {qn} (send, serial)", qtype=qt))
        elif k == "recvfrom_return" and e.get("rcode"):
            qt, qn = ids.get((lwp, e.get("id")), ("?", "?"))
            lane(lwp).marks.append(Mark(t, "answer", f"answer to {qt} {qn}: {e['rcode']}",
                                        rcode=e["rcode"], qtype=qt))
        elif k == "lost_answer":
            waited = (e.get("waited_ms") or 0) / 1000.0
            lane(lwp).marks.append(Mark(t - waited, "lost",
                                        f"{e.get('qtype')} answer for {e.get('qname')} lost: "
                                        f"waited {waited:.1f} s", dur=waited, qtype=e.get("qtype")))
        elif k == "sticky_engaged":
            ln = lane(lwp)
            if ln.sticky_at is None:
                ln.sticky_at = t
            ln.marks.append(Mark(t, "sticky", "sticky single-request mode: " + (e.get("cause") or "")))
        elif k == "stall":
            ms = e.get("measured_ms") or 0
            lane(lwp).marks.append(Mark(t - ms / 1000.0, "stall",
                                        f"stall {ms / 1000:.1f} s (predicted {e.get('predicted_ms')} ms) "
                                        f"on {e.get('qname')}", dur=ms / 1000.0))
        elif k == "doomed_poll":
            lane(lwp).marks.append(Mark(t, "doomed", f"doomed poll on {e.get('qname')}: {e.get('reason')}"))
    # a doomed poll still running at the end: show it as an open stall
    out = [l for l in lanes.values() if l.marks]
    for ln in out:
        ln.marks.sort(key=lambda m: m.t)
    ts = [m.t for l in out for m in l.marks] + [m.t + m.dur for l in out for m in l.marks]
    if not ts:
        return [], 0.0, 1.0
    return sorted(out, key=lambda l: l.lwp), min(ts), max(max(ts), min(ts) + 1.0)


SYMBOL = {"query_parallel": "‖", "query_serial": "→", "answer": "·", "lost": "░",
          "sticky": "S", "stall": "█", "doomed": "!"}
PRIORITY = ["sticky", "stall", "doomed", "lost", "query_serial", "query_parallel", "answer"]


def terminal(report: dict, width: int = 72) -> str:
    lanes, t0, t1 = build(report)
    if not lanes:
        return "(no resolver activity traced)"
    span = t1 - t0
    rows = []
    label_w = max(len(f"LWP {l.lwp} {l.name or ''}") for l in lanes) + 1
    scale = " " * label_w + f"|0s{'':{width - 10}}{span:6.1f}s|"
    rows.append(scale)
    for ln in lanes:
        cells = [" "] * width
        rank = [len(PRIORITY)] * width
        for m in ln.marks:
            a = int((m.t - t0) / span * (width - 1))
            b = int((m.t + m.dur - t0) / span * (width - 1)) if m.dur else a
            for i in range(max(a, 0), min(b, width - 1) + 1):
                r = PRIORITY.index(m.kind)
                if r < rank[i]:
                    cells[i], rank[i] = SYMBOL[m.kind], r
        rows.append(f"{'LWP %d %s' % (ln.lwp, ln.name or ''):{label_w}}|{''.join(cells)}|")
    rows.append("legend: ‖ A+AAAA in parallel  → serial query  · answer  ░ waiting for a lost answer  "
                "S switch to sticky serial mode  ! doomed poll  █ stall")
    return "\n".join(rows)


COLORS = {"NOERROR": "#2e7d32", "NXDOMAIN": "#78909c", "SERVFAIL": "#c62828",
          "REFUSED": "#c62828", "NOTIMP": "#c62828"}


def svg(report: dict, width: int = 1100) -> str:
    lanes, t0, t1 = build(report)
    left, right, lane_h, top = 210, 20, 70, 40
    height = top + max(1, len(lanes)) * lane_h + 56
    plot = width - left - right
    x = lambda t: left + (t - t0) / (t1 - t0) * plot
    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="#ffffff"/>']
    parts += _svg_axis(x, t0, t1, top, height)
    for i, ln in enumerate(lanes):
        parts += _svg_lane(ln, x, t0, t1, top + i * lane_h, lane_h, left, plot)
    ly = height - 24
    legend = [("#1565c0", "‖ A+AAAA in parallel"), ("#ef6c00", "▶ serial query"),
              ("#78909c", "● answer (grey NXDOMAIN, green NOERROR, red error)"),
              ("#b71c1c", "✗ lost answer   ! doomed poll"), ("#d32f2f", "█ stall"),
              ("#e65100", "| switch to sticky serial mode (orange background)")]
    lx = 10
    for c, txt in legend:
        w = 14 + 7.0 * len(txt)
        if lx + w > width:
            lx, ly = 10, ly + 16
        parts.append(f'<text x="{lx}" y="{ly}" fill="{c}">{e(txt)}</text>')
        lx += w
    parts.append("</svg>")
    return "".join(parts)


def _svg_axis(x, t0: float, t1: float, top: int, height: int) -> list[str]:
    """The time axis: a grid line and a label every tick."""
    parts = []
    step = _tick(t1 - t0)
    t = 0.0
    while t <= (t1 - t0) + 1e-9:
        xx = x(t0 + t)
        parts.append(f'<line x1="{xx:.1f}" y1="{top - 10}" x2="{xx:.1f}" y2="{height - 30}" '
                     f'stroke="#e0e0e0"/><text x="{xx:.1f}" y="{top - 14}" text-anchor="middle" '
                     f'fill="#555">{t:g}s</text>')
        t += step
    return parts


def _svg_lane(ln: Lane, x, t0: float, t1: float, y: int, lane_h: int, left: int,
              plot: int) -> list[str]:
    """One thread's lane at height ``y``: its label, the mode background, its marks."""
    e = html.escape
    mid = y + lane_h / 2
    end_sticky = x(t1)
    parts = [f'<text x="10" y="{mid + 4:.1f}" fill="#222" font-weight="bold">'
             f'{e("LWP %d" % ln.lwp)}</text><text x="10" y="{mid + 18:.1f}" fill="#555">'
             f'{e(ln.name or "")}</text>',
             f'<rect x="{left}" y="{y + 8}" width="{plot}" height="{lane_h - 16}" '
             f'fill="#e3f2fd"><title>parallel A/AAAA (sendmmsg)</title></rect>']
    if ln.sticky_at is not None:
        sx = x(ln.sticky_at)
        parts.append(f'<rect x="{sx:.1f}" y="{y + 8}" width="{end_sticky - sx:.1f}" '
                     f'height="{lane_h - 16}" fill="#fff3e0"><title>sticky single-request '
                     f'(serial) mode, for the rest of the process</title></rect>')
    parts += [_svg_mark(m, x, t0, y, lane_h) for m in ln.marks]
    return parts


def _svg_mark(m: Mark, x, t0: float, y: int, lane_h: int) -> str:
    """The SVG of one mark in the lane at height ``y`` ("" for an unknown kind)."""
    e = html.escape
    mid = y + lane_h / 2
    mx = x(m.t)
    tip = f"<title>{e(m.label)} (+{m.t - t0:.3f} s)</title>"
    if m.kind == "stall":
        w = max(2.0, x(m.t + m.dur) - mx)
        return (f'<rect x="{mx:.1f}" y="{mid - 9:.1f}" width="{w:.1f}" height="18" '
                f'fill="#d32f2f" opacity="0.85">{tip}</rect><text x="{mx + w / 2:.1f}" '
                f'y="{mid + 4:.1f}" text-anchor="middle" fill="#fff" font-size="11">'
                f'{m.dur:.1f} s stall</text>')
    if m.kind == "query_parallel":
        return (f'<line x1="{mx:.1f}" y1="{mid - 20:.1f}" x2="{mx:.1f}" y2="{mid - 6:.1f}" '
                f'stroke="#1565c0" stroke-width="2">{tip}</line><line x1="{mx + 3:.1f}" '
                f'y1="{mid - 20:.1f}" x2="{mx + 3:.1f}" y2="{mid - 6:.1f}" stroke="#1565c0" '
                f'stroke-width="2">{tip}</line>')
    if m.kind == "query_serial":
        return (f'<polygon points="{mx:.1f},{mid - 20:.1f} {mx + 6:.1f},{mid - 14:.1f} '
                f'{mx:.1f},{mid - 8:.1f}" fill="#ef6c00">{tip}</polygon>')
    if m.kind == "answer":
        c = COLORS.get(m.rcode, "#2e7d32")
        return f'<circle cx="{mx:.1f}" cy="{mid + 14:.1f}" r="4" fill="{c}">{tip}</circle>'
    if m.kind == "lost":
        w = max(2.0, x(m.t + m.dur) - mx)
        return (f'<rect x="{mx:.1f}" y="{mid - 9:.1f}" width="{w:.1f}" height="18" '
                f'fill="none" stroke="#b71c1c" stroke-dasharray="4 3">{tip}</rect>'
                f'<text x="{mx + w / 2:.1f}" y="{mid + 4:.1f}" text-anchor="middle" '
                f'fill="#b71c1c" font-size="11">waiting for a lost {e(m.qtype or "")} answer'
                f'</text><text x="{mx + w:.1f}" y="{mid + 19:.1f}" text-anchor="middle" '
                f'fill="#b71c1c" font-size="16" font-weight="bold">✗{tip}</text>')
    if m.kind == "sticky":
        return (f'<line x1="{mx:.1f}" y1="{y + 4}" x2="{mx:.1f}" y2="{y + lane_h - 4}" '
                f'stroke="#e65100" stroke-width="3">{tip}</line><text x="{mx + 4:.1f}" '
                f'y="{y + 18}" fill="#e65100" font-weight="bold">sticky serial mode{tip}</text>')
    if m.kind == "doomed":
        return (f'<text x="{mx:.1f}" y="{mid - 12:.1f}" fill="#b71c1c" font-weight="bold" '
                f'text-anchor="middle">!{tip}</text>')
    return ""


def _tick(span: float) -> float:
    for s in (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600):
        if span / s <= 12:
            return s
    return 1200


def write_html(report: dict, path: str) -> None:
    e = html.escape
    v = report.get("verdict", {})
    g = report.get("glibc", {})
    rem = "".join(f"<li>{e(r)}</li>" for r in v.get("remediation", []))
    stalls = "".join(f"<tr><td>{s['lwp']}</td><td>{e(str(s.get('qname')))}</td>"
                     f"<td>{e(str(s.get('lookup')))}</td><td>{s.get('predicted_ms')}</td>"
                     f"<td>{s.get('measured_ms')}</td></tr>" for s in report.get("stalls", []))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>gdbdiag timeline — pid {report['target']['pid']}</title>
<style>body{{font-family:sans-serif;margin:20px;color:#222}} h1{{font-size:20px}}
.v{{padding:8px 12px;border-radius:6px;display:inline-block;font-weight:bold}}
.STICKY_STALLING,.STALLING_NOT_STICKY{{background:#ffcdd2}} .STICKY_NO_STALL{{background:#fff3e0}} .HEALTHY{{background:#c8e6c9}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}</style></head>
<body><h1>gdbdiag — resolver timeline of pid {report['target']['pid']} {e(str(report['target'].get('exe') or ''))}</h1>
<p>glibc {e(str(g.get('version') or '?'))} ({e(str(g.get('distro_package') or 'package unknown'))}); bug 30081:
{'affected' if g.get('affected_30081') else 'fixed' if g.get('affected_30081') is False else 'unknown'};
sticky bit in <code>{e(str(g.get('sticky_field') or '?'))}</code></p>
<p><span class="v {e(v.get('code', ''))}">{e(v.get('code', ''))}</span> {e(v.get('summary', ''))}</p>
{svg(report)}
<h2>Stalls</h2><table><tr><th>LWP</th><th>query</th><th>getaddrinfo</th><th>predicted ms</th><th>measured ms</th></tr>{stalls}</table>
<h2>What to do</h2><ul>{rem}</ul>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
