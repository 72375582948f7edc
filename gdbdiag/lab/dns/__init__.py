"""A small CoreDNS-like DNS server for the lab, with fault injection and a query log.

It plays the part of the cluster DNS (CoreDNS with the kubernetes plugin) in the
incident of glibc bug 30081:

* names under a configured zone (``cluster.local`` by default) get an authoritative
  NXDOMAIN with the zone's SOA in the authority section, like CoreDNS's kubernetes
  plugin (unless a record is configured for the name);
* names with a configured record get it (NOERROR, empty answer for the other type);
* anything else gets the configured error rcode (SERVFAIL by default), either echoing
  the question (``echo``) or as a bare 12-byte header with qdcount 0
  (``header-only``, as some servers send; glibc bug 31890);
* faults: drop the Nth matching AAAA answer, drop the first matching AAAA answer after
  some seconds, drop the next matching AAAA answer when SIGUSR1 arrives, delay every
  answer, drop every answer.

Run it as ``python -m gdbdiag.lab.dns --listen ADDR --port PORT --log FILE ...``
(see :func:`build_parser`). It answers UDP and, on the same port, TCP (length-prefixed,
for glibc's fallback after a truncated answer) with the same logic; the AAAA loss faults
model UDP packet loss and apply to UDP only.

Signals: SIGUSR1 arms "drop the next matching AAAA answer" (once per signal); SIGHUP
re-reads the ``--config`` file (flags given on the command line still win) and resets
the fault counters; SIGTERM/SIGINT exit cleanly with status 0. Signals are applied in
arrival order with respect to queries: a query sent after ``kill()`` returned sees the
signal's effect.

Every query is logged as one JSON object per line, flushed at once (see
:func:`log_record` for the fields); :func:`read_log` reads the file back.

The decision logic is pure and socket-free: :func:`handle_query` takes the raw request,
a :class:`Config` and the mutable :class:`Faults` state and returns the reply bytes (or
``None`` when the answer is dropped) and the log record. :class:`DNSServer` is the
asyncio glue.
"""
from .answer import Faults, handle_query, log_record, resolve
from .cli import build_parser, main
from .config import ERROR_RCODES, ERROR_STYLES, Config, ConfigError, load_config, parse_record
from .logfile import read_log, wait_log, wait_ready
from .server import DNSServer

__all__ = [
    "ERROR_RCODES",
    "ERROR_STYLES",
    "Config",
    "ConfigError",
    "Faults",
    "DNSServer",
    "parse_record",
    "resolve",
    "handle_query",
    "log_record",
    "read_log",
    "wait_log",
    "wait_ready",
    "build_parser",
    "load_config",
    "main",
]
