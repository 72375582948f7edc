"""The lab DNS server's configuration: zones, records, the error answer, faults (file
keys and command-line flags alike)."""
from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ...errors import EXIT_USAGE, GdbdiagError

#: rcodes the server may answer for names it cannot resolve. SERVFAIL, REFUSED and
#: NOTIMP are the "error answers" of bug 30081; NXDOMAIN (and FORMERR) are offered as
#: controls.
ERROR_RCODES = ("SERVFAIL", "REFUSED", "NOTIMP", "NXDOMAIN", "FORMERR")
ERROR_STYLES = ("echo", "header-only")
RECORD_TYPES = ("A", "AAAA")


class ConfigError(GdbdiagError, ValueError):
    """Invalid configuration (file or flags)."""

    code = EXIT_USAGE


def _norm_name(name: str) -> str:
    """Lower-case, absolute (trailing dot) form of a DNS name; ``.`` for the root."""
    name = name.strip().lower().rstrip(".")
    return name + "." if name else "."


def parse_record(spec: str) -> tuple[str, str, str]:
    """Parse ``NAME=A:1.2.3.4`` / ``NAME=AAAA:::1`` into ``(name., type, address)``.

    The name is normalised (lower case, trailing dot) and the address validated and
    written in its canonical form.
    """
    name, sep, rest = spec.partition("=")
    rtype, sep2, value = rest.partition(":")
    rtype = rtype.strip().upper()
    if not sep or not sep2 or not name.strip() or not value.strip():
        raise ConfigError(f"record {spec!r}: expected NAME=A:ADDRESS or NAME=AAAA:ADDRESS")
    if rtype not in RECORD_TYPES:
        raise ConfigError(f"record {spec!r}: type {rtype!r} not supported (A, AAAA)")
    try:
        addr = (ipaddress.IPv4Address if rtype == "A" else ipaddress.IPv6Address)(value.strip())
    except ValueError as exc:
        raise ConfigError(f"record {spec!r}: {exc}") from None
    return _norm_name(name), rtype, str(addr)


def _record_specs(value: Any) -> list[str]:
    """Accept a list of ``NAME=TYPE:ADDR`` strings, or ``{name: ["TYPE:ADDR", ...]}``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        specs = []
        for name, items in value.items():
            for item in [items] if isinstance(items, str) else list(items):
                specs.append(f"{name}={item}")
        return specs
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    raise ConfigError(f"records: expected a list or a mapping, got {type(value).__name__}")


@dataclass(frozen=True)
class Config:
    """What the server answers and which faults it injects. Immutable; see :meth:`from_dict`.

    ``records`` maps a normalised name (lower case, trailing dot) to a mapping of record
    type (``A``/``AAAA``) to a tuple of addresses. ``match`` restricts the AAAA loss
    faults (nth, after, SIGUSR1) to names matching that fnmatch glob (case-insensitive,
    compared without the trailing dot); ``None`` matches every name. ``delay_ms`` and
    ``drop_all`` apply to every query.
    """

    zones: tuple[str, ...] = ("cluster.local.",)
    rcode: str = "SERVFAIL"
    error_style: str = "echo"
    records: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    drop_aaaa_nth: int | None = None
    drop_aaaa_after: float | None = None
    match: str | None = None
    delay_ms: float = 0.0
    drop_all: bool = False
    ttl: int = 30

    KEYS = (
        "zones", "rcode", "error_style", "records", "drop_aaaa_nth", "drop_aaaa_after",
        "match", "delay_ms", "drop_all", "ttl",
    )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        """Build a validated config from JSON-like data (the ``--config`` file format).

        Keys (``-`` and ``_`` are interchangeable): ``zones`` (list or string),
        ``rcode``, ``error_style``, ``records`` (list of ``NAME=TYPE:ADDR`` or
        ``{name: ["TYPE:ADDR"]}``), ``drop_aaaa_nth``, ``drop_aaaa_after``, ``match``,
        ``delay_ms``, ``drop_all``, ``ttl``. Missing keys take the defaults; unknown
        keys are an error.
        """
        d = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        kw: dict[str, Any] = {}
        if d.get("zones") is not None:
            zones = [d["zones"]] if isinstance(d["zones"], str) else list(d["zones"])
            kw["zones"] = tuple(dict.fromkeys(_norm_name(z) for z in zones))
        if d.get("rcode") is not None:
            rcode = str(d["rcode"]).upper()
            if rcode not in ERROR_RCODES:
                raise ConfigError(f"rcode {d['rcode']!r}: expected one of {', '.join(ERROR_RCODES)}")
            kw["rcode"] = rcode
        if d.get("error_style") is not None:
            style = str(d["error_style"]).lower()
            if style not in ERROR_STYLES:
                raise ConfigError(f"error_style {d['error_style']!r}: expected echo or header-only")
            kw["error_style"] = style
        records: dict[str, dict[str, list[str]]] = {}
        for spec in _record_specs(d.get("records")):
            name, rtype, addr = parse_record(spec)
            addrs = records.setdefault(name, {}).setdefault(rtype, [])
            if addr not in addrs:
                addrs.append(addr)
        kw["records"] = {n: {t: tuple(a) for t, a in m.items()} for n, m in records.items()}
        if d.get("drop_aaaa_nth") is not None:
            nth = d["drop_aaaa_nth"]
            if isinstance(nth, bool) or not isinstance(nth, int) or nth < 1:
                raise ConfigError(f"drop_aaaa_nth {nth!r}: expected an integer >= 1")
            kw["drop_aaaa_nth"] = nth
        if d.get("drop_aaaa_after") is not None:
            after = d["drop_aaaa_after"]
            if isinstance(after, bool) or not isinstance(after, (int, float)) or after < 0:
                raise ConfigError(f"drop_aaaa_after {after!r}: expected seconds >= 0")
            kw["drop_aaaa_after"] = float(after)
        if d.get("match") is not None:
            kw["match"] = None if str(d["match"]) in ("", "*") else str(d["match"])
        if d.get("delay_ms") is not None:
            delay = d["delay_ms"]
            if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
                raise ConfigError(f"delay_ms {delay!r}: expected milliseconds >= 0")
            kw["delay_ms"] = float(delay)
        if d.get("drop_all") is not None:
            if not isinstance(d["drop_all"], bool):
                raise ConfigError(f"drop_all {d['drop_all']!r}: expected true or false")
            kw["drop_all"] = d["drop_all"]
        if d.get("ttl") is not None:
            ttl = d["ttl"]
            if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl < 2**31:
                raise ConfigError(f"ttl {ttl!r}: expected an integer >= 0")
            kw["ttl"] = ttl
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, accepted back by :meth:`from_dict` (a ``--config`` file)."""
        return {
            "zones": [z.rstrip(".") for z in self.zones],
            "rcode": self.rcode,
            "error_style": self.error_style,
            "records": [
                f"{name.rstrip('.')}={rtype}:{addr}"
                for name, types in self.records.items()
                for rtype, addrs in types.items()
                for addr in addrs
            ],
            "drop_aaaa_nth": self.drop_aaaa_nth,
            "drop_aaaa_after": self.drop_aaaa_after,
            "match": self.match,
            "delay_ms": self.delay_ms,
            "drop_all": self.drop_all,
            "ttl": self.ttl,
        }

    def matches(self, qname: str) -> bool:
        """Does ``qname`` fall under the faults' ``match`` glob?"""
        if self.match is None:
            return True
        return fnmatch.fnmatchcase(qname.rstrip(".").lower(), self.match.rstrip(".").lower())

    def zone_of(self, qname: str) -> str | None:
        """The longest configured zone containing ``qname``, or ``None``."""
        name = _norm_name(qname)
        best = None
        for zone in self.zones:
            if zone == "." or name == zone or name.endswith("." + zone):
                if best is None or len(zone) > len(best):
                    best = zone
        return best


def load_config(path: str | os.PathLike[str] | None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Config from a JSON file (if any) with ``overrides`` (non-``None`` keys) on top."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        data.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Config.from_dict(data)
