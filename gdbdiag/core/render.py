"""Text rendering shared by the plugin and the host side (pure; tabulate when present)."""
from __future__ import annotations

import time

from . import events as E
from .flags import decode_flags, decode_options

try:                                   # inside gdb without the venv: plain text
    from tabulate import tabulate as _tabulate
except ImportError:                    # pragma: no cover - exercised in gdb tests
    _tabulate = None


def table(rows, headers) -> str:
    rows = [["" if c is None else c for c in r] for r in rows]
    if _tabulate is not None:
        return _tabulate(rows, headers=headers)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else \
        [len(h) for h in headers]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


SEEN_SET = ("status", "send_dg_enter", "passive:status")


def since_text(t: dict) -> str:
    """When a thread went sticky: as given (the plugin's wording), else the local time of
    ``since`` (seconds since the epoch)."""
    if t.get("since_text"):
        return t["since_text"]
    since = t.get("since")
    if not isinstance(since, (int, float)) or not t.get("sticky"):
        return ""
    text = time.strftime("%H:%M:%S", time.localtime(since)) + f".{int(since * 1000) % 1000:03d}"
    # a bit found set (not seen switching): it was set before that read
    return f"before {text}" if t.get("since_how") in SEEN_SET else text


def who(lwp, name=None) -> str:
    return f"LWP {lwp}" + (f" ({name})" if name else "")


def finding_line(f: E.Event, t0: float | None = None, name: str | None = None) -> str:
    rel = f"+{f.t - t0:8.3f}s " if t0 is not None else ""
    d = f.data
    if f.kind == E.STICKY_ENGAGED:
        what = (f"statp->{d.get('field') or d.get('sticky_field')} single-request bit set — {d.get('cause')}")
        if d.get("how") in ("status", "send_dg_enter"):
            what = f"already in single-request mode (statp->{d.get('field')}) — {d.get('cause')}"
        return f"[gdbdiag] {rel}{who(f.lwp, name)} sticky_engaged: {what}"
    if f.kind == E.DOOMED_POLL:
        return (f"[gdbdiag] {rel}{who(f.lwp, name)} doomed_poll: poll(POLLIN, "
                f"{d.get('predicted_ms')} ms) for {d.get('qname')}: {d.get('reason')} — "
                f"predicted stall {d.get('predicted_ms')} ms")
    if f.kind == E.STALL:
        return (f"[gdbdiag] {rel}{who(f.lwp, name)} stall: {d.get('measured_ms')} ms measured "
                f"(predicted {d.get('predicted_ms')} ms) on {d.get('qname')}"
                + (f", in getaddrinfo(\"{d['lookup']}\")" if d.get("lookup") else ""))
    if f.kind == E.LOST_ANSWER:
        return (f"[gdbdiag] {rel}{who(f.lwp, name)} lost_answer: no {d.get('qtype')} answer for "
                f"{d.get('qname')} after {d.get('waited_ms')} ms")
    if f.kind == E.RESOLVER_WAIT:
        return (f"[gdbdiag] {rel}{who(f.lwp, name)} resolver_wait: poll(POLLIN, "
                f"{d.get('timeout_ms')} ms) on UDP fd {d.get('fd')}"
                + (" in send_dg" if d.get("frame_confirmed") else "")
                + (" (thread sticky)" if d.get("sticky") else ""))
    return f"[gdbdiag] {rel}{who(f.lwp, name)} {f.kind}: {d}"


def dump_table(rows) -> str:
    return table([[k, v, p] for k, v, p in rows], ["field", "value", "source"])


def status_rows(threads: list[dict]) -> list[list]:
    rows = []
    for t in threads:
        rows.append([t["lwp"], t.get("name"),
                     f"{t['options']:#x} {decode_options(t['options'])}" if t.get("options") is not None else "?",
                     f"{t['flags']:#x} {decode_flags(t['flags'])}" if t.get("flags") is not None else "-",
                     ("yes (" + (t.get("sticky_field") or "?") + ")") if t.get("sticky") else "no",
                     since_text(t), t.get("cause") or "",
                     t.get("nameservers") or "", t.get("resolver") or "",
                     t.get("last_query") or "",
                     f"{t['last_stall_ms']:.0f} ms" if t.get("last_stall_ms") else ""])
    return rows


STATUS_HEADERS = ["LWP", "thread", "options", "_flags", "sticky", "since", "cause",
                  "nameservers", "timeout/attempts/ndots", "last query", "last stall"]


def status_table(threads: list[dict]) -> str:
    return table(status_rows(threads), STATUS_HEADERS)


def report_text(rep: dict) -> str:
    out = []
    g = rep.get("glibc", {})
    out.append(f"== target pid {rep['target']['pid']} {rep['target'].get('exe') or ''}: "
               f"glibc {g.get('version') or '?'} ({g.get('distro_package') or 'package ?'}), "
               f"bug 30081: {'affected' if g.get('affected_30081') else 'fixed' if g.get('affected_30081') is False else 'unknown'}"
               f" [{g.get('affected_source') or '?'}], sticky bit in {g.get('sticky_field') or '?'}")
    thr = [t for t in rep.get("threads", []) if t.get("sticky") or t.get("resolver_seen")]
    if thr:
        out.append(table([[t["lwp"], t.get("lwp_target"), t.get("name"),
                           "yes" if t["sticky"] else "no", since_text(t),
                           t.get("cause") or ""] for t in thr],
                         ["LWP", "LWP (target ns)", "thread", "sticky", "since", "cause"]))
    if rep.get("stalls"):
        out.append("== stalls")
        out.append(table([[s["lwp"], s.get("qname"), s.get("lookup"), s.get("predicted_ms"),
                           s.get("measured_ms")] for s in rep["stalls"]],
                         ["LWP", "query", "getaddrinfo", "predicted ms", "measured ms"]))
    stacks = {tuple(t.get("stack") or ()) for t in rep.get("threads", []) if t.get("stack")
              and (t.get("sticky") or t.get("stalls"))}
    for st in stacks:
        out.append("== blocked application stack (innermost first)")
        out.extend(f"   #{i:<2} {fn}" for i, fn in enumerate(st))
    for kind, title in (("sticky_engaged", "where the thread switched"),
                        ("doomed_poll", "where it waits for the answer that cannot come")):
        ev = next((e for e in rep.get("events", []) if e["kind"] == kind
                   and (e.get("source") or {}).get("text")), None)
        if ev:
            src = ev["source"]
            out.append(f"== {title}: glibc {src['file']}:{src['line']}")
            out.append(src["text"])
    if rep.get("refuted"):
        out.append(f"== {len(rep['refuted'])} doomed-poll prediction(s) withdrawn: the poll was "
                   "answered after all" + (f" ({rep['records_lost']} probe record(s) were lost)"
                                           if rep.get("records_lost") else ""))
    v = rep["verdict"]
    out.append(f"== verdict: {v['code']} — {v['summary']}")
    for r in v.get("remediation", []):
        out.append(f"   - {r}")
    return "\n".join(out)
