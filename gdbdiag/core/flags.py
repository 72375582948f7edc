"""Constants and decoders for the resolver state gdbdiag shows (pure, no gdb).

Values are glibc's (resolv/resolv.h, resolv/resolv-internal.h, bits/poll.h,
arpa/nameser_compat.h); names are the ones users grep for.
"""
from __future__ import annotations

# statp->options (resolv/resolv.h)
RES_OPTIONS = [
    ("RES_INIT", 0x00000001), ("RES_DEBUG", 0x00000002), ("RES_AAONLY", 0x00000004),
    ("RES_USEVC", 0x00000008), ("RES_PRIMARY", 0x00000010), ("RES_IGNTC", 0x00000020),
    ("RES_RECURSE", 0x00000040), ("RES_DEFNAMES", 0x00000080), ("RES_STAYOPEN", 0x00000100),
    ("RES_DNSRCH", 0x00000200), ("RES_INSECURE1", 0x00000400), ("RES_INSECURE2", 0x00000800),
    ("RES_NOALIASES", 0x00001000), ("RES_USE_INET6", 0x00002000), ("RES_ROTATE", 0x00004000),
    ("RES_NOCHECKNAME", 0x00008000), ("RES_KEEPTSIG", 0x00010000), ("RES_BLAST", 0x00020000),
    ("RES_USE_EDNS0", 0x00100000), ("RES_SNGLKUP", 0x00200000), ("RES_SNGLKUPREOP", 0x00400000),
    ("RES_USE_DNSSEC", 0x00800000), ("RES_NOTLDQUERY", 0x01000000), ("RES_NORELOAD", 0x02000000),
    ("RES_TRUSTAD", 0x04000000), ("RES_NOAAAA", 0x08000000), ("RES_STRICTERR", 0x10000000),
]
RES_SNGLKUP = 0x00200000
RES_SNGLKUPREOP = 0x00400000

# statp->_flags (resolv/resolv-internal.h)
RES_FLAGS = [
    ("RES_F_VC", 0x00000001), ("RES_F_CONN", 0x00000002), ("RES_F_EDNS0ERR", 0x00000004),
    ("RES_F_SNGLKUP", 0x00200000), ("RES_F_SNGLKUPREOP", 0x00400000),
]
RES_F_SNGLKUP = 0x00200000
RES_F_SNGLKUPREOP = 0x00400000

POLL_BITS = [("POLLIN", 0x001), ("POLLPRI", 0x002), ("POLLOUT", 0x004), ("POLLERR", 0x008),
             ("POLLHUP", 0x010), ("POLLNVAL", 0x020), ("POLLRDNORM", 0x040),
             ("POLLRDBAND", 0x080), ("POLLWRNORM", 0x100), ("POLLWRBAND", 0x200)]
POLLIN, POLLOUT = 0x001, 0x004

RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
          6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE"}
ERROR_RCODES = {"SERVFAIL", "NOTIMP", "REFUSED"}   # send_dg's next_ns path
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 41: "OPT", 255: "ANY"}


def decode_bits(value: int | None, table) -> str:
    """``0x2002c1`` -> ``RES_INIT|RES_RECURSE|RES_DEFNAMES|RES_DNSRCH|RES_SNGLKUP``."""
    if value is None:
        return "?"
    names, rest = [], value
    for name, bit in table:
        if value & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return "|".join(names) if names else "0"


def decode_options(value):
    return decode_bits(value, RES_OPTIONS)


def decode_flags(value):
    return decode_bits(value, RES_FLAGS)


def decode_poll(value):
    return decode_bits(value, POLL_BITS)


def rcode_name(code: int | None) -> str | None:
    return None if code is None else RCODES.get(code, str(code))


def qtype_name(code: int | None) -> str | None:
    return None if code is None else QTYPES.get(code, f"TYPE{code}")


def sticky_bits(options: int | None, flags: int | None) -> dict:
    """Which single-request bits are set, and in which field."""
    out = {"single_request": False, "single_request_reopen": False, "field": None}
    if options is not None and options & (RES_SNGLKUP | RES_SNGLKUPREOP):
        out.update(single_request=bool(options & (RES_SNGLKUP | RES_SNGLKUPREOP)),
                   single_request_reopen=bool(options & RES_SNGLKUPREOP), field="options")
    if flags is not None and flags & (RES_F_SNGLKUP | RES_F_SNGLKUPREOP):
        out.update(single_request=True,
                   single_request_reopen=out["single_request_reopen"] or bool(flags & RES_F_SNGLKUPREOP),
                   field="_flags" if out["field"] is None else "options+_flags")
    return out


def parse_dns_header(data: bytes) -> dict | None:
    """The fixed 12-byte DNS header (id, qr, opcode, aa, tc, rd, ra, rcode, counts)."""
    from dnslib import DNSBuffer, DNSHeader
    if data is None or len(data) < 12:
        return None
    h = DNSHeader.parse(DNSBuffer(bytes(data[:12])))
    return {"id": h.id, "qr": h.qr, "opcode": h.opcode, "aa": h.aa, "tc": h.tc, "rd": h.rd,
            "ra": h.ra, "rcode": rcode_name(h.rcode), "qdcount": h.q, "ancount": h.a,
            "nscount": h.auth, "arcount": h.ar}


def parse_question(data: bytes) -> tuple[str | None, str | None]:
    """(qname with trailing dot, qtype) of the first question of a DNS message."""
    from dnslib import DNSBuffer, DNSError, DNSHeader, DNSQuestion
    if data is None or len(data) < 12:
        return None, None
    try:
        buf = DNSBuffer(bytes(data))
        if DNSHeader.parse(buf).q == 0:
            return None, None
        q = DNSQuestion.parse(buf)
    except (DNSError, Exception):  # dnslib raises assorted errors on truncated input
        return None, None
    return str(q.qname), qtype_name(q.qtype)
