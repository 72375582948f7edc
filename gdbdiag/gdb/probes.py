"""Probes: internal gdb breakpoints placed from symbols and send_dg's disassembly.

Each probe reads the machine state at its PC and hands an :class:`Event` to the session
(``session.observe``); in record mode ``stop()`` returns False and the target runs on, in
step mode it returns True and the session prints the step's dump. No line numbers: the
chain by symbol (getaddrinfo from the analyzer), send_dg's entry, call sites, return
sites and sticky-bit writers from the machine code (``analysis.analyse``: gdbdiag.glibc's
analyzer at the object's load bias), struct offsets from the ABI. Locals come from DWARF
when gdb has it; without it from registers at the entry, and from what the probes of
the same send_dg call saw for that thread (``session.saved(lwp)["dg"]``).
"""
import time

import gdb

from ..core import events as E
from ..core.events import Event
from ..core.flags import parse_dns_header, parse_question
from . import target as T

# The chain, outermost first: (symbol, event data read at entry: (key, DWARF name, the
# register the x86-64 ABI passes that argument in, for when there is no DWARF))
CHAIN = (
    ("getaddrinfo", (("name", "name", "rdi"),)),
    ("_nss_dns_gethostbyname4_r", (("name", "name", "rdi"),)),
    ("__res_context_search", (("name", "name", "rsi"), ("type", "type", "rcx"))),
    ("__res_context_querydomain", (("name", "name", "rsi"), ("domain", "domain", "rdx"))),
    ("__res_context_query", (("name", "name", "rsi"), ("type", "type", "rcx"))),
    ("__res_context_send", (("buflen", "buflen", "rdx"), ("buflen2", "buflen2", "r8"))),
)


class Probe(gdb.Breakpoint):
    """An internal breakpoint at one PC; ``reader`` turns the stop into an Event."""

    def __init__(self, session, pc: int, kind: str, reader, label: str, thread=None):
        super().__init__("*%#x" % pc, type=gdb.BP_BREAKPOINT, internal=True)
        self.silent = True
        self.session, self.pc, self.kind, self.reader, self.label = session, pc, kind, reader, label
        if thread is not None:
            self.thread = thread

    def stop(self):
        try:
            ev = self.reader(self)
        except Exception as exc:   # a probe must never break the target's run
            self.session.probe_error(self, exc)
            return False
        if ev is None:
            return False
        ev.pc = self.pc
        return self.session.observe(ev, self)


def _ev(kind, data, prov):
    return Event(t=time.time(), lwp=T.lwp(), kind=kind, data=data, prov=prov)


def _query(addr, length):
    if not addr:
        return None
    n = int(length) if length and 12 <= int(length) <= 512 else 512
    raw = T.mem(addr, n)
    qname, qtype = parse_question(raw)
    if qname is None and n < 512:
        # a length DWARF recovered from the caller (entry_value) can be stale here; the
        # question itself tells where it ends
        try:
            qname, qtype = parse_question(T.mem(addr, 512))
        except gdb.MemoryError:
            pass
    hdr = parse_dns_header(raw)
    return {"id": hdr["id"] if hdr else None, "qname": qname, "qtype": qtype}


# -- readers ---------------------------------------------------------------------------
def read_chain(function, fields):
    def reader(probe):
        data, prov = {"function": function, "thread_name": T.thread_name()}, {"function": "probe"}
        for key, var, regname in fields:
            v, src = T.read_var(var), "dwarf"
            if v is None:                # no DWARF here: the ABI's argument register at entry
                v, src = (T.reg(regname) if key in ("name", "domain") else T.sreg32(regname)), "register"
            if key in ("name", "domain"):
                v = T.cstring(v)
            data[key] = v
            prov[key] = src
        if function == "getaddrinfo":
            # unwinding costs a millisecond: only where a stall can follow (a sticky
            # thread), or in full mode
            det = probe.session.detector
            th = det.threads.get(T.lwp()) if det else None
            if probe.session.full or (th is not None and th.sticky):
                data["stack"] = T.app_stack(namer=probe.session.pc_name)
                prov["stack"] = "memory"
            return _ev(E.GAI_ENTER, data, prov)
        return _ev(E.CHAIN, data, prov)
    return reader


def read_send_dg_enter(offsets):
    def reader(probe):
        # At the entry PC the arguments are where the ABI puts them; DWARF agrees there.
        vals, prov = {}, {}
        for var, regname in (("statp", "rdi"), ("buf", "rsi"), ("buflen", "rdx"),
                             ("buf2", "rcx"), ("buflen2", "r8")):
            v = T.read_var(var)
            if v is None:
                v = T.reg(regname) if var in ("statp", "buf", "buf2") else T.sreg32(regname)
                prov[var] = "register"
            else:
                prov[var] = "dwarf"
            vals[var] = v
        statp = vals["statp"]
        data = {"function": "send_dg", "thread_name": T.thread_name(), "statp": statp,
                "options": T.u64(statp + offsets["options"]),
                "flags": T.u32(statp + offsets["_flags"]) if "_flags" in offsets else None,
                "retrans": T.i32(statp + offsets["retrans"]),
                "q1": _query(vals["buf"], vals["buflen"]),
                "q2": _query(vals["buf2"], vals["buflen2"]) if vals["buf2"] else None}
        prov.update({"options": "memory", "flags": "memory", "retrans": "memory",
                     "q1": "memory", "q2": "memory"})
        # this call's bookkeeping for the probes that follow in it (no DWARF there)
        probe.session.saved(T.lwp())["dg"] = {"statp": statp, "q1": data["q1"], "q2": data["q2"],
                                               "prov": prov["statp"], "answers": []}
        return _ev(E.SEND_DG_ENTER, data, prov)
    return reader


def read_poll_call(site, with_stack=False):
    def reader(probe):
        pfd = T.reg("rdi")
        raw = T.mem(pfd, 8)
        fd = int.from_bytes(raw[0:4], "little", signed=True)
        events = int.from_bytes(raw[4:6], "little")
        probe.session.saved(T.lwp())["pfd"] = pfd
        data = {"function": "poll", "site": site, "fd": fd, "events": events,
                "nfds": T.sreg32("rsi"), "timeout_ms": T.sreg32("rdx"), "pfd": pfd}
        prov = {"fd": "memory", "events": "memory", "nfds": "register",
                "timeout_ms": "register", "pfd": "register", "site": "disassembly"}
        if with_stack:               # lean: no getaddrinfo probe; the stack from here
            data["stack"], prov["stack"] = T.app_stack(24, probe.session.pc_name), "memory"
        return _ev(E.POLL_ENTER, data, prov)
    return reader


def read_poll_return(probe):
    saved = probe.session.saved(T.lwp())
    data = {"function": "poll", "n": T.sreg32("rax")}
    prov = {"n": "register"}
    pfd = saved.pop("pfd", None)
    if pfd:
        raw = T.mem(pfd, 8)
        data["fd"] = int.from_bytes(raw[0:4], "little", signed=True)
        data["revents"] = int.from_bytes(raw[6:8], "little")
        prov.update(fd="memory", revents="memory")
    return _ev(E.POLL_RETURN, data, prov)


def read_sendmmsg_return(probe):
    return _ev(E.SENDMMSG_RETURN, {"function": "sendmmsg", "n": T.sreg32("rax")},
               {"n": "register"})


def read_send_call(probe):
    buf = T.reg("rsi")
    qid = int.from_bytes(T.mem(buf, 2), "big") if buf else None
    probe.session.saved(T.lwp())["send_id"] = qid
    return _ev("send_call", {"function": "send", "fd": T.sreg32("rdi"), "id": qid,
                             "len": T.sreg64("rdx")},
               {"fd": "register", "id": "memory", "len": "register"})


def read_send_return(probe):
    qid = probe.session.saved(T.lwp()).pop("send_id", None)
    data = {"function": "send", "n": T.sreg64("rax")}
    prov = {"n": "register"}
    if qid is not None:
        data["id"], prov["id"] = qid, "memory"
    return _ev(E.SEND_RETURN, data, prov)


def read_recvfrom_call(probe):
    buf = T.reg("rsi")
    probe.session.saved(T.lwp())["recv_buf"] = buf
    return _ev("recvfrom_call", {"function": "recvfrom", "fd": T.sreg32("rdi"),
                                 "buf": buf, "len": T.sreg64("rdx")},
               {"fd": "register", "buf": "register", "len": "register"})


def read_recvfrom_return(probe):
    saved = probe.session.saved(T.lwp())
    buf = saved.pop("recv_buf", None)
    n = T.sreg64("rax")
    data, prov = {"function": "recvfrom", "n": n}, {"n": "register"}
    if buf and n >= 12:
        hdr = parse_dns_header(T.mem(buf, 12))
        for k in ("id", "rcode", "qdcount", "ancount", "tc"):
            data[k], prov[k] = hdr[k], "memory"
        if saved.get("dg") is not None:          # this send_dg call's answers, in order
            saved["dg"]["answers"].append({k: data[k] for k in ("id", "rcode", "qdcount")})
    return _ev(E.RECVFROM_RETURN, data, prov)


def answered(dg, accepts_header_only=False):
    """(recvresp1, recvresp2) of send_dg's current call, replayed from the answers its
    recvfrom returned (send_dg's own rule: the first query's id sets recvresp1 once,
    another matching answer recvresp2; recvresp2 starts at 1 without a second query).
    Header-only answers (qdcount 0) do not count before bug 31890's fix."""
    q1, q2 = dg.get("q1") or {}, dg.get("q2") or {}
    r1, r2 = 0, 0 if dg.get("q2") else 1
    for a in dg.get("answers", []):
        if a.get("qdcount") == 0 and not accepts_header_only:
            continue
        if not r1 and a.get("id") == q1.get("id"):
            r1 = 1
        elif dg.get("q2") and a.get("id") == q2.get("id"):
            r2 = 1
    return r1, r2


def read_flag_write(write, offsets, homes=None, dwarf=True):
    field_off = offsets[write["field"]]
    bit = 0x00200000 if write["flag"].endswith("SNGLKUP") else 0x00400000
    basereg = write["base_reg"].lstrip("%")
    homes = homes or {}

    def reader(probe):
        statp = T.reg(basereg)
        before = (T.u64 if write["field"] == "options" else T.u32)(statp + field_off)
        data = {"function": "send_dg", "field": write["field"], "bit": write["flag"],
                "before": before, "value": before | bit, "statp": statp}
        prov = {"field": "disassembly", "bit": "disassembly", "before": "memory",
                "value": "inferred", "statp": "register"}
        # the queries of this send_dg call (DWARF has buf/buf2 at every PC) and which
        # answer had come: recvresp1/2 are <optimized out>; their home slots are an
        # inference from the location lists, and labelled so
        if dwarf:
            b, bl, b2, bl2 = (T.read_param_at_entry(v) for v in ("buf", "buflen", "buf2", "buflen2"))
            if b and bl:
                data["q1"], prov["q1"] = _query(b, bl), "dwarf"
                if b2 and bl2:
                    data["q2"], prov["q2"] = _query(b2, bl2), "dwarf"
            for var in ("recvresp1", "recvresp2"):
                home = homes.get(var)
                if home and home[0] == "slot":
                    data[var], prov[var] = T.i32(T.reg("rsp") + home[1]), "inferred"
        _from_call_state(probe.session, data, prov)
        return _ev(E.FLAG_WRITE, data, prov)
    return reader


def _from_call_state(session, data, prov):
    """Without DWARF: the queries as send_dg's entry probe read them for this thread
    (registers -> memory), and recvresp1/2 replayed from this call's recvfrom returns."""
    dg = session.saved(T.lwp()).get("dg")
    if dg is None:
        return
    if "q1" not in data and dg.get("q1"):
        data["q1"], prov["q1"] = dg["q1"], "memory"
        if dg.get("q2"):
            data["q2"], prov["q2"] = dg["q2"], "memory"
    if "recvresp1" not in data and "recvresp2" not in data:
        hdr_only = bool(session.build.get("bug31890_fixed"))
        data["recvresp1"], data["recvresp2"] = answered(dg, hdr_only)
        prov["recvresp1"] = prov["recvresp2"] = "inferred"


def read_send_dg_return(probe):
    return _ev(E.SEND_DG_RETURN, {"function": "send_dg", "ret": T.sreg32("rax")},
               {"ret": "register"})


# -- arming ------------------------------------------------------------------------------
def chain_addresses(name):
    """Entry PC of ``name`` (the function start, before its prologue), or [] when the
    object holding it is not loaded. gdb's expression evaluator finds the function under
    glibc's internal aliases too (2.31's DWARF names __res_context_query
    __GI___res_context_query)."""
    try:
        v = gdb.parse_and_eval("&'%s'" % name)
    except gdb.error:
        return []
    if v.type.strip_typedefs().code != gdb.TYPE_CODE_PTR or \
            v.type.strip_typedefs().target().code != gdb.TYPE_CODE_FUNC:
        return []
    return [int(v.cast(gdb.lookup_type("unsigned long")))]


def thread_is_sticky(session) -> bool:
    """The selected thread's statp has a single-request bit (options or _flags). statp by
    DWARF, else as send_dg's entry probe saw it for this thread in this call."""
    offsets = session.offsets
    statp = T.read_var("statp") if session.dwarf else None
    if not statp:
        statp = (session.saved(T.lwp()).get("dg") or {}).get("statp")
    if not statp:
        return True                      # cannot tell here: let the probe record it
    opts = T.u64(statp + offsets["options"])
    flags = T.u32(statp + offsets["_flags"]) if "_flags" in offsets else 0
    return bool((opts | flags) & 0x600000)


class StickyProbe(Probe):
    """Lean mode: a probe that only reports for threads already in single-request mode."""

    def stop(self):
        try:
            if not thread_is_sticky(self.session):
                return False
        except Exception as exc:
            self.session.probe_error(self, exc)
            return False
        return super().stop()


class WatchProbe(Probe):
    """No DWARF: send_dg's entry and recvfrom, watched on every lookup from the start for
    bookkeeping only (the reader saves this call's queries and answers per thread, so the
    sticky-bit writer can name the lost query). Reported once the session follows sticky
    threads, and then only for sticky threads (or in full mode, for all)."""

    def stop(self):
        try:
            ev = self.reader(self)
            if ev is None or not self.session.escalated:
                return False
            if not self.session.full and not thread_is_sticky(self.session):
                return False
        except Exception as exc:   # a probe must never break the target's run
            self.session.probe_error(self, exc)
            return False
        ev.pc = self.pc
        return self.session.observe(ev, self)


def arm(session, analysis, offsets, thread=None, chain=True, lean=False, part="all"):
    """Create probes; returns the list. ``analysis`` is analysis.analyse()'s result.

    ``part``:
    - "all": the chain, send_dg's entry, call and return sites, the flag writes — every
      lookup of every thread stops at each (``--step``, ``--full``);
    - "watch": what must be watched while no thread is sticky: the instructions that
      set the sticky bit (they fire once, at the switch) and, unless lean, getaddrinfo's
      entry (one stop per lookup: the name and the application stack). Without DWARF
      also send_dg's entry and its recvfrom call and return (WatchProbe: bookkeeping of
      this call's queries and answers, so the switch names the lost query);
    - "sticky": armed by the session once a thread is or becomes sticky: send_dg's
      probes, which report only for sticky threads (others pass after a two-word
      read), and, unless lean, the rest of the chain. Lean leaves out the chain, the
      POLLOUT check poll and send_dg's returns; its stack is read at the poll.
    """
    probes = []
    dwarf = session.dwarf

    def add(pc, kind, reader, label, klass=Probe):
        probes.append(klass(session, pc, kind, reader, label, thread))

    if part in ("all", "watch"):
        for w in analysis["flag_writes"]:
            add(w["pc"], E.FLAG_WRITE, read_flag_write(w, offsets, analysis.get("home_locations"), dwarf),
                "send_dg: statp->%s |= %s" % (w["field"], w["flag"]))
    if chain and not lean:
        _arm_chain(add, analysis, part)
    cls = Probe if part == "all" else StickyProbe
    watched = part != "all" and not dwarf        # entry and recvfrom: WatchProbes
    if part == "watch":
        if watched:
            _arm_entry_and_recvfrom(add, analysis, offsets, WatchProbe)
        return probes
    if not watched:
        _arm_entry_and_recvfrom(add, analysis, offsets, cls)
    for c in analysis["calls"]:
        k = c["kind"]
        if k == "poll":
            site = c.get("site") or ("wait" if c.get("timeout_arg") != "0" else "check")
            if lean and site == "check":
                continue
            add(c["pc"], E.POLL_ENTER, read_poll_call(site, with_stack=lean or part == "sticky"),
                "send_dg:poll(%s)" % site, cls)
            add(c["ret_pc"], E.POLL_RETURN, read_poll_return, "send_dg:poll(%s) returned" % site, cls)
        elif k == "sendmmsg":
            add(c["ret_pc"], E.SENDMMSG_RETURN, read_sendmmsg_return, "send_dg:sendmmsg returned", cls)
        elif k == "send":
            add(c["pc"], "send_call", read_send_call, "send_dg:send", cls)
            add(c["ret_pc"], E.SEND_RETURN, read_send_return, "send_dg:send returned", cls)
    if not lean:
        for pc in analysis.get("returns", []):
            add(pc, E.SEND_DG_RETURN, read_send_dg_return, "send_dg returns", cls)
    return probes


def _arm_entry_and_recvfrom(add, analysis, offsets, cls):
    add(analysis["entry"], E.SEND_DG_ENTER, read_send_dg_enter(offsets), "send_dg", cls)
    for c in analysis["calls"]:
        if c["kind"] == "recvfrom":
            add(c["pc"], "recvfrom_call", read_recvfrom_call, "send_dg:recvfrom", cls)
            add(c["ret_pc"], E.RECVFROM_RETURN, read_recvfrom_return, "send_dg:recvfrom returned", cls)


def _arm_chain(add, analysis, part):
    """getaddrinfo in the watch set (at the analyzer's address: libc's .dynsym, no debug
    symbols needed), the rest of the chain in the sticky set (by gdb's symbols: functions
    gdb cannot resolve are left out)."""
    for name, fields in CHAIN:
        if part != "all" and (part == "watch") != (name == "getaddrinfo"):
            continue
        if name == "getaddrinfo" and analysis.get("getaddrinfo"):
            pcs = [analysis["getaddrinfo"]["pc"]]
        else:
            pcs = chain_addresses(name)
        for pc in pcs:
            add(pc, E.CHAIN, read_chain(name, fields), name)
