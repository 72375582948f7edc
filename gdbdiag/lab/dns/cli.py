"""``python -m gdbdiag.lab.dns``: the command line."""
from __future__ import annotations

import argparse
import asyncio
import sys

from .config import ERROR_RCODES, ERROR_STYLES, Config, ConfigError, load_config
from .server import DNSServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gdbdiag.lab.dns",
        description="CoreDNS-like lab DNS server with fault injection and a JSON query log. "
                    "Flags override the --config file's keys of the same name. "
                    "SIGUSR1 arms one AAAA drop; SIGHUP reloads --config; SIGTERM exits.",
    )
    p.add_argument("--listen", default="127.0.0.1", help="IP address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=53, help="UDP and TCP port (0: any free port; default 53)")
    p.add_argument("--log", required=True, help="query log: one JSON object per line ('-': stdout)")
    p.add_argument("--config", help="JSON file with the config keys (reloaded on SIGHUP)")
    p.add_argument("--ready-file", help="written (JSON: pid, listen, port, tcp, started) once the sockets are bound; "
                        "removed on exit")
    p.add_argument("--no-tcp", dest="tcp", action="store_false", help="answer UDP only")
    g = p.add_argument_group("config (keys of the --config file)")
    g.add_argument("--zone", dest="zones", action="append", metavar="ZONE",
                   help="authoritative zone answered NXDOMAIN+SOA (repeatable; default cluster.local)")
    g.add_argument("--rcode", type=str.upper, choices=ERROR_RCODES,
                   help="rcode for names outside the zones without records (default SERVFAIL)")
    g.add_argument("--error-style", dest="error_style", choices=ERROR_STYLES,
                   help="echo: error answer echoes the question; header-only: 12-byte header, "
                        "qdcount 0 (glibc bug 31890) (default echo)")
    g.add_argument("--record", dest="records", action="append", metavar="NAME=TYPE:ADDR",
                   help="record, e.g. keydb-0.keydb=A:10.0.0.5 or x=AAAA:::1 (repeatable)")
    g.add_argument("--drop-aaaa-nth", dest="drop_aaaa_nth", type=int, metavar="N",
                   help="drop the answer to the Nth matching AAAA query (from 1), once")
    g.add_argument("--drop-aaaa-after", dest="drop_aaaa_after", type=float, metavar="SECONDS",
                   help="drop the first matching AAAA answer after SECONDS since start, once")
    g.add_argument("--match", metavar="GLOB",
                   help="AAAA drops apply only to names matching this fnmatch glob "
                        "(case-insensitive, no trailing dot; default all)")
    g.add_argument("--delay-ms", dest="delay_ms", type=float, metavar="MS", help="delay every answer")
    g.add_argument("--drop-all", dest="drop_all", action="store_const", const=True,
                   help="answer nothing")
    g.add_argument("--ttl", type=int, help="TTL of records and SOA (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in Config.KEYS}
    try:
        config = load_config(args.config, overrides)
    except (OSError, ValueError) as exc:
        print(f"gdbdiag.lab.dns: {exc}", file=sys.stderr)
        return 2
    server = DNSServer(config, listen=args.listen, port=args.port, log_path=args.log,
                       config_path=args.config, overrides=overrides,
                       ready_file=args.ready_file, tcp=args.tcp)
    try:
        asyncio.run(server.run())
    except (OSError, ConfigError) as exc:
        print(f"gdbdiag.lab.dns: {exc}", file=sys.stderr)
        return 1
    return 0
