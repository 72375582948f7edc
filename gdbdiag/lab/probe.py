"""Latency probe: GET against the lab's Redis in a loop, recording every request.

Runs on the host inside the pod's network namespace (``ip netns exec``), so it sees
Redis exactly as a client in the same pod would. ``run_probe`` is the library entry;
``python -m gdbdiag.lab.probe`` prints one JSON line per request and a summary line.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for p in parts:
        b = p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _read_reply(f) -> bytes:
    line = f.readline()
    if not line:
        raise ConnectionError("connection closed by redis")
    if line[:1] == b"$":
        n = int(line[1:].strip())
        if n >= 0:
            f.read(n + 2)
    elif line[:1] == b"-":
        raise RuntimeError(line[1:].strip().decode(errors="replace"))
    return line


def run_probe(host="127.0.0.1", port=6379, seconds=30.0, interval=0.1, key="gdbdiag:probe",
              request_timeout=60.0, emit=None, write=False) -> list[dict]:
    """Send GET every ``interval`` s for ``seconds`` s; one record per request.

    ``write``: SET gdbdiag:w:<n> instead (a concurrent writer: each record with
    ``"key"`` and no ``"error"`` is a write Redis acknowledged)."""
    records = []
    deadline = time.monotonic() + seconds
    sock = None
    while time.monotonic() < deadline:
        t = time.time()
        m0 = time.monotonic()
        rec = {"t": round(t, 4)}
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=request_timeout)
                f = sock.makefile("rb")
            if write:
                rec["key"] = f"gdbdiag:w:{len(records)}"
                sock.sendall(_command("SET", rec["key"], str(t)))
            else:
                sock.sendall(_command("GET", key))
            _read_reply(f)
            rec["ms"] = round((time.monotonic() - m0) * 1000, 2)
        except (OSError, RuntimeError, ConnectionError) as e:
            rec["ms"] = round((time.monotonic() - m0) * 1000, 2)
            rec["error"] = str(e) or e.__class__.__name__
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(interval)
        records.append(rec)
        if emit:
            emit(rec)
        left = interval - (time.monotonic() - m0)
        if left > 0:
            time.sleep(left)
    if sock is not None:
        sock.close()
    return records


def dbsize(host="127.0.0.1", port=6379, timeout=30.0) -> int:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_command("DBSIZE"))
        line = sock.makefile("rb").readline()
    if not line.startswith(b":"):
        raise RuntimeError(f"unexpected DBSIZE reply {line!r}")
    return int(line[1:])


def summarize(records: list[dict], slow_ms: float = 1000.0) -> dict:
    ok = [r["ms"] for r in records if "error" not in r]
    slow = [r for r in records if r["ms"] >= slow_ms]
    q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [ok[0] if ok else 0.0] * 99
    return {"requests": len(records), "errors": len(records) - len(ok),
            "slow": len(slow), "slow_ms_threshold": slow_ms,
            "max_ms": max(ok, default=0.0), "p50_ms": round(statistics.median(ok), 2) if ok else 0.0,
            "p99_ms": round(q[98], 2), "slow_requests": [{"t": r["t"], "ms": r["ms"]} for r in slow]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gdbdiag.lab.probe")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6379)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--write", action="store_true", help="SET new keys instead of GET")
    ap.add_argument("--dbsize", action="store_true", help="print DBSIZE and exit")
    args = ap.parse_args(argv)
    if args.dbsize:
        print(json.dumps({"dbsize": dbsize(args.host, args.port)}), flush=True)
        return 0

    def emit(rec):
        print(json.dumps(rec), flush=True)

    recs = run_probe(args.host, args.port, args.seconds, args.interval, emit=emit, write=args.write)
    print(json.dumps({"summary": summarize(recs)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
