"""Verdicts and remediations (pure): what the findings mean for this process."""
from __future__ import annotations

from . import events as E

HEALTHY = "HEALTHY"
STICKY_NO_STALL = "STICKY_NO_STALL"
STICKY_STALLING = "STICKY_STALLING"
STALLING_NOT_STICKY = "STALLING_NOT_STICKY"   # e.g. header-only error answers ignored (bug 31890)
CODES = (HEALTHY, STICKY_NO_STALL, STICKY_STALLING, STALLING_NOT_STICKY)


def decide(threads: list[dict], findings: list, build: dict | None = None) -> dict:
    """``threads``: ThreadState summaries; ``findings``: detector events; ``build``: glibc
    facts (affected_30081, sticky_field, version). Returns {code, summary, remediation}."""
    build = build or {}
    sticky = [t for t in threads if t.get("sticky")]
    doomed = [f for f in findings if f.kind == E.DOOMED_POLL]
    stalls = [f for f in findings if f.kind == E.STALL]
    affected = build.get("affected_30081")
    names = {f.get("qname") for f in doomed + stalls if f.get("qname")}
    lookups = {f.get("lookup") for f in doomed + stalls if f.get("lookup")}
    who = ", ".join(f"{t['lwp']}" + (f" ({t['name']})" if t.get("name") else "") for t in sticky)
    if (doomed or stalls) and not sticky:
        code = STALLING_NOT_STICKY
        reasons = sorted({f.get("reason") for f in doomed if f.get("reason")})
        summary = (f"{len(doomed)} doomed poll(s) in parallel mode, no thread sticky: "
                   + ("; ".join(reasons) if reasons else "answers glibc cannot use"))
    elif doomed or stalls:
        code = STICKY_STALLING
        ms = [f.get("measured_ms") for f in stalls if f.get("measured_ms") is not None]
        summary = (f"{len(sticky) or 'a'} thread(s) in sticky single-request mode [{who}]; "
                   f"{len(doomed)} doomed poll(s) after an error answer"
                   + (f", {len(ms)} stall(s) measured (max {max(ms) / 1000:.1f} s)" if ms else "")
                   + ": glibc bug 30081")
    elif sticky:
        code = STICKY_NO_STALL
        summary = (f"{len(sticky)} thread(s) in sticky single-request mode [{who}]; no stall seen"
                   + (": this glibc does not wait after an error answer (bug 30081 fixed)"
                      if affected is False else
                      " — but this glibc is affected by bug 30081: any SERVFAIL/REFUSED/NOTIMP "
                      "answer will stall it" if affected else ""))
    else:
        code = HEALTHY
        summary = "no thread is in single-request mode; no doomed poll seen"
    return {"code": code, "summary": summary,
            "remediation": remediations(code, sticky, names, lookups, build)}


def remediations(code, sticky, names, lookups, build) -> list[str]:
    if code == HEALTHY:
        return []
    out = []
    peer = sorted(lookups - {None})
    if code == STALLING_NOT_STICKY:
        out.append("The DNS server sends error answers without the question section "
                   "(header-only); glibc before the bug 31890 fix ignores them and waits the "
                   "whole timeout. Fix the server (CoreDNS answers with the question) or "
                   "upgrade glibc (Debian 12 >= 2.36-9+deb12u9, glibc >= 2.41).")
        return out
    if code == STICKY_STALLING:
        for name in peer or ["<peer name>"]:
            bare = name.rstrip(".")
            out.append(f"Use a fully qualified name with a trailing dot for the peer: "
                       f"`{bare}.default.svc.cluster.local.` instead of `{bare}` (e.g. in the "
                       "replicaof/replica config) — no search list, no error answer, no stall.")
        out.append("Upgrade glibc to a build with the bug 30081 fix: Debian 12 libc6 "
                   ">= 2.36-9+deb12u9, Debian 13 (2.41), or upstream >= 2.41 / the release/2.34"
                   "–2.40 branches after July 2024; Debian 11 (2.31) has no fix.")
        out.append("Bound each stall meanwhile: resolv.conf `options timeout:1 attempts:1` "
                   "(Kubernetes: pod spec dnsConfig.options) cuts 2 x 5 s to 1 s.")
        out.append("Make the DNS server answer NXDOMAIN instead of SERVFAIL/REFUSED/NOTIMP for "
                   "names it cannot resolve (CoreDNS: check the forward/upstream of the bare "
                   "name); an error answer is what makes a serial thread wait.")
    field = build.get("sticky_field") or (sticky[0].get("sticky_field") if sticky else None)
    out.append(f"The switch is per thread and lasts for the process's life (statp->{field or 'options'} "
               "RES_SNGLKUP): restarting the process clears it; it comes back at the next lost "
               "answer (UDP loss, conntrack races: `options single-request-reopen` avoids the "
               "race but makes every lookup serial).")
    return out
