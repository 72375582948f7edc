"""Pretty printers (struct pollfd, struct __res_state, the DNS HEADER) and $_res_sticky()."""
import gdb
import gdb.printing

from ..core.flags import (decode_flags, decode_options, decode_poll, rcode_name, sticky_bits)


class PollfdPrinter:
    def __init__(self, val):
        self.val = val

    def to_string(self):
        ev, rev = int(self.val["events"]) & 0xFFFF, int(self.val["revents"]) & 0xFFFF
        return "{fd = %d, events = %s, revents = %s}" % (
            int(self.val["fd"]), decode_poll(ev), decode_poll(rev) if rev else "0")


class ResStatePrinter:
    """The resolver state with its options/_flags decoded and sticky mode called out."""

    def __init__(self, val):
        self.val = val

    def to_string(self):
        opts = int(self.val["options"])
        try:
            flags = int(self.val["_flags"])
        except gdb.error:
            flags = None
        st = sticky_bits(opts, flags)
        sticky = ("STICKY single-request (in %s)" % st["field"]) if st["single_request"] else "parallel A/AAAA"
        return "__res_state: %s" % sticky

    def children(self):
        v = self.val
        opts = int(v["options"])
        yield "options", "%#x %s" % (opts, decode_options(opts))
        try:
            flags = int(v["_flags"])
            yield "_flags", "%#x %s" % (flags, decode_flags(flags))
        except gdb.error:
            pass
        for name in ("retrans", "retry", "nscount", "ndots", "pfcode"):
            try:
                yield name, v[name]
            except gdb.error:
                pass
        try:
            n = int(v["nscount"])
            for i in range(min(n, 3)):
                a = v["nsaddr_list"][i]
                ip = int(a["sin_addr"]["s_addr"])
                yield "nameserver[%d]" % i, "%d.%d.%d.%d" % (ip & 255, ip >> 8 & 255, ip >> 16 & 255, ip >> 24)
        except gdb.error:
            pass


class HeaderPrinter:
    """arpa/nameser_compat.h HEADER: id, flags, rcode by name, section counts."""

    def __init__(self, val):
        self.val = val

    def to_string(self):
        v = self.val
        f = lambda n: int(v[n])
        flags = [n for n in ("qr", "aa", "tc", "rd", "ra") if f(n)]
        return "{id = %d, %s, opcode = %d, rcode = %s, qd = %d, an = %d, ns = %d, ar = %d}" % (
            f("id"), "|".join(flags) or "-", f("opcode"), rcode_name(f("rcode")),
            f("qdcount"), f("ancount"), f("nscount"), f("arcount"))


def build_printer():
    pp = gdb.printing.RegexpCollectionPrettyPrinter("gdbdiag")
    pp.add_printer("pollfd", r"^pollfd$", PollfdPrinter)
    pp.add_printer("__res_state", r"^__res_state$", ResStatePrinter)
    pp.add_printer("HEADER", r"^HEADER$", HeaderPrinter)
    return pp


class ResSticky(gdb.Function):
    """$_res_sticky() -> 1 if the selected thread's resolver (*__resp) is in sticky
single-request mode (RES_SNGLKUP/REOPEN in options, or RES_F_SNGLKUP in _flags), else 0.
Usable in breakpoint conditions: `break connectWithMaster if $_res_sticky()`."""

    def __init__(self):
        super().__init__("_res_sticky")

    def invoke(self):
        st = gdb.parse_and_eval("__resp").dereference()
        try:
            flags = int(st["_flags"])
        except gdb.error:
            flags = None
        return 1 if sticky_bits(int(st["options"]), flags)["single_request"] else 0


def register():
    gdb.printing.register_pretty_printer(None, build_printer(), replace=True)
    ResSticky()
