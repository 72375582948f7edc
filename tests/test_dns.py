"""Tests for gdbdiag.lab.dns: the pure decision logic, then the real server.

Server tests start ``python -m gdbdiag.lab.dns`` as a subprocess on 127.0.0.1 with an
ephemeral port (``--port 0``, read back from ``--ready-file``) and query it with real
UDP/TCP sockets. No root, no mocks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from gdbdiag.lab import dns

REPO = Path(__file__).resolve().parents[1]
# How long we wait before calling an answer dropped. Expected answers get 2 s; the
# server's log (action "dropped") is what confirms a drop.
DROP_TIMEOUT = 0.4


# --------------------------------------------------------------------------------------
# helpers


def query_bytes(name: str, qtype: str = "A", *, qid: int | None = None) -> bytes:
    q = DNSRecord.question(name, qtype)
    if qid is not None:
        q.header.id = qid
    return q.pack()


@dataclass
class Answer:
    data: bytes
    client_port: int
    elapsed: float

    @property
    def msg(self) -> DNSRecord:
        return DNSRecord.parse(self.data)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    ready: Path
    config: Path | None
    started: float = 0.0

    def ask(self, name: str, qtype: str = "A", *, timeout: float = 2.0,
            tcp: bool = False) -> Answer | None:
        """Send one query; return the answer, or None if none came within ``timeout``."""
        data = query_bytes(name, qtype)
        qid = struct.unpack("!H", data[:2])[0]
        start = time.monotonic()
        if tcp:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(struct.pack("!H", len(data)) + data)
                buf = b""
                try:
                    while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                        chunk = s.recv(4096)
                        if not chunk:
                            return None
                        buf += chunk
                except socket.timeout:
                    return None
                reply, port = buf[2:], s.getsockname()[1]
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.bind(("127.0.0.1", 0))
                s.sendto(data, ("127.0.0.1", self.port))
                try:
                    reply, _ = s.recvfrom(65535)
                except socket.timeout:
                    return None
                port = s.getsockname()[1]
        assert struct.unpack("!H", reply[:2])[0] == qid
        return Answer(reply, port, time.monotonic() - start)

    def entries(self, n: int | None = None) -> list[dict]:
        """The log, waiting until it has at least ``n`` entries."""
        if n is None:
            return dns.read_log(self.log)
        return dns.wait_log(self.log, lambda e: len(e) >= n, timeout=5)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path):
    """Factory: ``start_server(*flags, config=dict|None)`` -> running :class:`Server`."""
    servers: list[Server] = []

    def start(*flags: str, config: dict | None = None) -> Server:
        i = len(servers)
        log, ready = tmp_path / f"dns{i}.log", tmp_path / f"dns{i}.ready"
        cfg = None
        argv = [sys.executable, "-m", "gdbdiag.lab.dns", "--listen", "127.0.0.1",
                "--port", "0", "--log", str(log), "--ready-file", str(ready)]
        if config is not None:
            cfg = tmp_path / f"dns{i}.json"
            cfg.write_text(json.dumps(config))
            argv += ["--config", str(cfg)]
        proc = subprocess.Popen(argv + list(flags), cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = Server(proc, 0, log, ready, cfg)
        servers.append(server)
        try:
            info = dns.wait_ready(ready, timeout=10, proc=proc)
        except RuntimeError:
            pytest.fail(f"server failed: {proc.stderr.read().decode()}")
        assert info["pid"] == proc.pid and info["tcp"] is True
        server.port, server.started = info["port"], info["started"]
        return server

    yield start
    for server in servers:  # always end what we started, by PID
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(5)
        server.proc.stderr.close()


# --------------------------------------------------------------------------------------
# pure logic (no sockets)


def decide(config: dns.Config, faults: dns.Faults, name: str, qtype: str = "AAAA",
           proto: str = "udp", now: float | None = None):
    return dns.handle_query(query_bytes(name, qtype), client="127.0.0.1:1", proto=proto,
                            config=config, faults=faults, now=now)


def test_config_from_dict_normalises_and_validates():
    c = dns.Config.from_dict({"zones": "Cluster.Local.", "rcode": "refused",
                              "error-style": "header-only",
                              "records": {"KeyDB-0.keydb": ["A:10.0.0.5", "AAAA:fd00::5"]},
                              "match": "*", "drop_aaaa_nth": 2})
    assert c.zones == ("cluster.local.",)
    assert c.rcode == "REFUSED" and c.error_style == "header-only" and c.match is None
    assert c.records == {"keydb-0.keydb.": {"A": ("10.0.0.5",), "AAAA": ("fd00::5",)}}
    assert dns.Config.from_dict(c.to_dict()) == c
    for bad in ({"rcode": "NOERROR"}, {"drop_aaaa_nth": 0}, {"records": ["x=MX:1.2.3.4"]},
                {"records": ["x=A:::1"]}, {"bogus": 1}, {"error_style": "loud"},
                {"delay_ms": -1}, {"drop_all": "yes"}):
        with pytest.raises(dns.ConfigError):
            dns.Config.from_dict(bad)


def test_parse_record():
    assert dns.parse_record("a.b=A:1.2.3.4") == ("a.b.", "A", "1.2.3.4")
    assert dns.parse_record("a.b.=AAAA:::1") == ("a.b.", "AAAA", "::1")
    with pytest.raises(dns.ConfigError):
        dns.parse_record("a.b:1.2.3.4")


def test_faults_state_machine_is_explicit():
    config = dns.Config(drop_aaaa_nth=2, drop_aaaa_after=10.0, match="keydb-0*")
    f = dns.Faults(started=1000.0)
    seq = [
        ("keydb-0.keydb", "AAAA", 1001, None),       # 1st matching AAAA
        ("keydb-0.keydb", "A", 1001, None),          # A: not counted
        ("keydb-1.keydb", "AAAA", 1001, None),       # no match: not counted
        ("keydb-0.keydb", "AAAA", 1001, "drop-aaaa-nth"),   # 2nd matching AAAA
        ("keydb-0.keydb", "AAAA", 1001, None),
        ("keydb-0.keydb", "AAAA", 1011, "drop-aaaa-after"),  # >= 10 s after start
        ("keydb-0.keydb", "AAAA", 1012, None),       # both used up
    ]
    for name, qtype, now, want in seq:
        reply, rec = decide(config, f, name, qtype, now=now)
        assert rec["reason"] == want, (name, qtype, now)
        assert (reply is None) == (want is not None)
        assert rec["action"] == ("dropped" if want else "answered")
    assert f.aaaa_seen == 5 and f.dropped == 2 and f.nth_done and f.after_done

    f.arm()
    assert decide(config, f, "keydb-0.keydb", "AAAA", proto="tcp")[0] is not None  # UDP only
    assert decide(config, f, "keydb-0.keydb", "AAAA")[1]["reason"] == "drop-aaaa-armed"
    assert decide(config, f, "keydb-0.keydb", "AAAA")[1]["reason"] is None
    assert f.armed == 0

    everything = dns.Config(drop_all=True)
    reply, rec = decide(everything, dns.Faults(), "x.cluster.local", "A", proto="tcp")
    assert reply is None and rec["reason"] == "drop-all" and rec["rcode"] == "NXDOMAIN"


def test_resolve_pure():
    config = dns.Config(records={"big.example.": {"A": tuple(f"10.0.{i // 256}.{i % 256}"
                                                              for i in range(40))}})
    big_udp, rcode = dns.resolve(DNSRecord.question("big.example", "A"), config)
    msg = DNSRecord.parse(big_udp)
    assert rcode == "NOERROR" and msg.header.tc == 1 and not msg.rr and len(big_udp) <= 512
    big_tcp, _ = dns.resolve(DNSRecord.question("big.example", "A"), config, proto="tcp")
    assert len(DNSRecord.parse(big_tcp).rr) == 40
    # the parent of a record is an empty non-terminal: NOERROR, not the error rcode
    _, rcode = dns.resolve(DNSRecord.question("example", "A"), config)
    assert rcode == "NOERROR"
    # garbage with a header gets FORMERR; shorter than a header gets nothing
    reply, rec = dns.handle_query(b"\x12\x34\x01\x00\x00\x01\xff", client="c:1", proto="udp",
                                  config=config, faults=dns.Faults())
    assert reply is None and rec["action"] == "ignored"
    reply, rec = dns.handle_query(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff",
                                  client="c:1", proto="udp", config=config, faults=dns.Faults())
    assert reply[:2] == b"\x12\x34" and reply[3] & 0xF == RCODE.FORMERR and len(reply) == 12
    response = DNSRecord.question("x.test").reply().pack()  # never answer a response
    reply, rec = dns.handle_query(response, client="c:1", proto="udp", config=config,
                                  faults=dns.Faults())
    assert reply is None and (rec["action"], rec["reason"]) == ("ignored", "response")


def test_read_log_skips_partial_last_line(tmp_path):
    p = tmp_path / "q.log"
    assert dns.read_log(p) == []
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    assert dns.read_log(p) == [{"a": 1}, {"a": 2}]


# --------------------------------------------------------------------------------------
# the real server


def test_cluster_local_names_are_authoritative_nxdomain_with_soa(start_server):
    s = start_server()
    for name, qtype in [("keydb-0.keydb.default.svc.cluster.local", "A"),
                        ("keydb-0.keydb.svc.cluster.local", "AAAA"),
                        ("KEYDB-0.keydb.Cluster.Local.", "A"),
                        ("cluster.local", "A")]:
        m = s.ask(name, qtype).msg
        assert m.header.rcode == RCODE.NXDOMAIN and m.header.aa == 1 and m.header.qr == 1
        assert str(m.q.qname).rstrip(".") == name.rstrip(".") and QTYPE[m.q.qtype] == qtype
        assert not m.rr and len(m.auth) == 1
        soa = m.auth[0]
        assert soa.rtype == QTYPE.SOA and str(soa.rname) == "cluster.local." and soa.ttl == 30
        assert str(soa.rdata.mname) == "ns.dns.cluster.local."
        assert str(soa.rdata.rname) == "hostmaster.cluster.local."


def test_other_zones(start_server):
    s = start_server("--zone", "svc.example", "--zone", "cluster.local")
    m = s.ask("a.svc.example", "A").msg
    assert m.header.rcode == RCODE.NXDOMAIN and str(m.auth[0].rname) == "svc.example."
    assert s.ask("x.cluster.local").msg.header.rcode == RCODE.NXDOMAIN
    assert s.ask("example", "A").msg.header.rcode == RCODE.SERVFAIL


@pytest.mark.parametrize("rcode", ["SERVFAIL", "REFUSED", "NOTIMP"])
def test_bare_name_gets_the_error_rcode_echoing_the_question(start_server, rcode):
    s = start_server() if rcode == "SERVFAIL" else start_server("--rcode", rcode.lower())
    for qtype in ("A", "AAAA"):
        a = s.ask("keydb-0.keydb", qtype)
        m = a.msg
        assert m.header.rcode == getattr(RCODE, rcode) and m.header.aa == 0
        assert m.header.ra == 1 and m.header.rd == 1 and m.header.q == 1
        assert str(m.q.qname) == "keydb-0.keydb." and QTYPE[m.q.qtype] == qtype
        assert len(a.data) == 31  # the incident's 31-byte SERVFAIL: header + question


def test_header_only_error_style(start_server):
    s = start_server("--error-style", "header-only", "--rcode", "REFUSED")
    a = s.ask("keydb-0.keydb", "AAAA")
    assert len(a.data) == 12
    _, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", a.data)
    assert (qd, an, ns, ar) == (0, 0, 0, 0)
    assert flags & 0x8000 and flags & 0xF == RCODE.REFUSED
    # zone names are still answered in full
    m = s.ask("x.cluster.local", "A").msg
    assert m.header.rcode == RCODE.NXDOMAIN and m.header.q == 1
    assert s.entries(2)[0]["size"] == 12


def test_records(start_server):
    s = start_server("--record", "keydb-0.keydb=A:10.0.0.5", "--record", "keydb-0.keydb=A:10.0.0.6",
                     "--record", "v6only.test=AAAA:fd00::1",
                     "--record", "keydb-1.keydb.default.svc.cluster.local=A:10.0.0.7")
    m = s.ask("keydb-0.keydb", "A").msg
    assert m.header.rcode == RCODE.NOERROR and m.header.aa == 1
    assert sorted(str(rr.rdata) for rr in m.rr) == ["10.0.0.5", "10.0.0.6"]
    assert all(rr.ttl == 30 and rr.rtype == QTYPE.A for rr in m.rr)
    m = s.ask("keydb-0.keydb", "AAAA").msg  # has only A: NOERROR, empty
    assert m.header.rcode == RCODE.NOERROR and not m.rr
    m = s.ask("v6only.test", "AAAA").msg
    assert [str(rr.rdata) for rr in m.rr] == ["fd00::1"]
    m = s.ask("V6ONLY.test.", "A").msg
    assert m.header.rcode == RCODE.NOERROR and not m.rr
    m = s.ask("keydb-1.keydb.default.svc.cluster.local", "A").msg  # record inside the zone
    assert m.header.rcode == RCODE.NOERROR and [str(rr.rdata) for rr in m.rr] == ["10.0.0.7"]
    m = s.ask("keydb-1.keydb.default.svc.cluster.local", "AAAA").msg  # NODATA with SOA
    assert m.header.rcode == RCODE.NOERROR and not m.rr and m.auth[0].rtype == QTYPE.SOA
    assert s.ask("keydb-2.keydb", "A").msg.header.rcode == RCODE.SERVFAIL


def test_drop_aaaa_nth_drops_exactly_the_second_aaaa(start_server):
    s = start_server("--drop-aaaa-nth", "2")
    plan = [("keydb-0.keydb", "A", True), ("keydb-0.keydb", "AAAA", True),
            ("keydb-0.keydb", "A", True), ("keydb-0.keydb", "AAAA", False),  # 2nd AAAA
            ("keydb-0.keydb", "A", True), ("keydb-0.keydb", "AAAA", True),
            ("x.cluster.local", "AAAA", True)]
    for name, qtype, answered in plan:
        timeout = 2.0 if answered else DROP_TIMEOUT
        assert (s.ask(name, qtype, timeout=timeout) is not None) == answered, (name, qtype)
    log = s.entries(7)
    assert [e["action"] for e in log] == ["answered"] * 3 + ["dropped"] + ["answered"] * 3
    dropped = log[3]
    assert dropped["reason"] == "drop-aaaa-nth" and dropped["qtype"] == "AAAA"
    assert dropped["rcode"] == "SERVFAIL" and dropped["size"] == 0 and dropped["tx"] is None


def test_match_glob_restricts_the_drop(start_server):
    s = start_server("--drop-aaaa-nth", "1", "--match", "keydb-0*")
    assert s.ask("keydb-1.keydb", "AAAA") is not None
    assert s.ask("keydb-1.keydb.default.svc.cluster.local", "AAAA") is not None
    assert s.ask("KEYDB-0.keydb.default.svc.cluster.local", "AAAA",
                 timeout=DROP_TIMEOUT) is None  # first matching AAAA, case-insensitive
    assert s.ask("keydb-0.keydb", "AAAA") is not None  # once only
    assert [e["reason"] for e in s.entries(4)] == [None, None, "drop-aaaa-nth", None]


def test_match_glob_compares_without_trailing_dot(start_server):
    s = start_server("--drop-aaaa-nth", "1", "--match", "keydb-0.keydb")
    assert s.ask("keydb-0.keydb.default.svc.cluster.local", "AAAA") is not None
    assert s.ask("keydb-0.keydb.", "AAAA", timeout=DROP_TIMEOUT) is None


def test_drop_aaaa_after(start_server):
    s = start_server("--drop-aaaa-after", "0.8")
    early = time.time() < s.started + 0.6
    if early:  # (skipped if this machine was too slow to ask in time)
        assert s.ask("keydb-0.keydb", "AAAA") is not None
    while time.time() < s.started + 0.85:
        time.sleep(0.02)
    assert s.ask("keydb-0.keydb", "A") is not None  # A: never dropped
    assert s.ask("keydb-0.keydb", "AAAA", timeout=DROP_TIMEOUT) is None
    assert s.ask("keydb-0.keydb", "AAAA") is not None
    want = [None, "drop-aaaa-after", None]
    assert [e["reason"] for e in s.entries(3 + early)] == [None] * early + want


def test_sigusr1_arms_one_drop(start_server):
    s = start_server("--match", "keydb-0*")
    assert s.ask("keydb-0.keydb", "AAAA") is not None
    s.signal(signal.SIGUSR1)
    assert s.ask("keydb-9.keydb", "AAAA") is not None  # not matching
    assert s.ask("keydb-0.keydb", "A") is not None
    assert s.ask("keydb-0.keydb", "AAAA", timeout=DROP_TIMEOUT) is None
    assert s.ask("keydb-0.keydb", "AAAA") is not None
    s.signal(signal.SIGUSR1)  # can be armed again
    assert s.ask("keydb-0.keydb", "AAAA", timeout=DROP_TIMEOUT) is None
    assert [e["reason"] for e in s.entries(6)] == [
        None, None, None, "drop-aaaa-armed", None, "drop-aaaa-armed"]
    assert s.proc.poll() is None


def test_delay(start_server):
    s = start_server("--delay-ms", "300")
    a = s.ask("keydb-0.keydb", "A")
    assert a is not None and a.elapsed >= 0.29
    assert a.msg.header.rcode == RCODE.SERVFAIL
    t = s.ask("x.cluster.local", "A", tcp=True)
    assert t is not None and t.elapsed >= 0.29
    log = s.entries(2)
    assert log[0]["delay_ms"] == 300 and log[0]["action"] == "answered"
    assert all(e["tx"] - e["rx"] >= 0.29 for e in log)


def test_drop_all(start_server):
    s = start_server("--drop-all")
    assert s.ask("keydb-0.keydb", "A", timeout=DROP_TIMEOUT) is None
    assert s.ask("x.cluster.local", "AAAA", timeout=DROP_TIMEOUT) is None
    assert s.ask("x.cluster.local", "A", timeout=DROP_TIMEOUT, tcp=True) is None
    log = s.entries(3)
    assert {(e["action"], e["reason"], e["size"]) for e in log} == {("dropped", "drop-all", 0)}
    assert [e["proto"] for e in log] == ["udp", "udp", "tcp"]


def test_log_lines(start_server):
    s = start_server()
    before = time.time()
    a = s.ask("keydb-0.keydb", "A")
    b = s.ask("keydb-0.keydb.default.svc.cluster.local", "AAAA", tcp=True)
    log = s.entries(2)
    lines = s.log.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) == e for line, e in zip(lines, log))
    e = log[0]
    assert set(e) == {"t", "client", "proto", "id", "qtype", "qname", "rcode", "action",
                      "reason", "size", "delay_ms", "rx", "tx"}
    # rx is the kernel's arrival stamp: a little before the server handled it (t)
    assert e["rx"] <= e["t"] <= e["tx"] <= time.time()
    assert e["t"] - e["rx"] < 1.0
    assert isinstance(e["t"], float) and before - 1 <= e["t"] <= time.time()
    assert e["client"] == f"127.0.0.1:{a.client_port}" and e["proto"] == "udp"
    assert e["id"] == a.msg.header.id and e["qtype"] == "A" and e["qname"] == "keydb-0.keydb."
    assert e["rcode"] == "SERVFAIL" and e["action"] == "answered" and e["reason"] is None
    assert e["size"] == len(a.data) == 31
    e = log[1]
    assert e["proto"] == "tcp" and e["client"] == f"127.0.0.1:{b.client_port}"
    assert e["qtype"] == "AAAA" and e["rcode"] == "NXDOMAIN" and e["size"] == len(b.data)
    assert log[0]["t"] <= log[1]["t"]


def test_tcp_answers_truncated_udp(start_server):
    flags = [f"--record=big.test=A:10.1.{i // 256}.{i % 256}" for i in range(40)]
    s = start_server(*flags)
    u = s.ask("big.test", "A").msg
    assert u.header.tc == 1 and not u.rr
    t = s.ask("big.test", "A", tcp=True).msg
    assert t.header.tc == 0 and len(t.rr) == 40


def test_config_file_flags_override_and_sighup_reload(start_server):
    s = start_server("--rcode", "NOTIMP",
                     config={"rcode": "REFUSED", "records": ["a.test=A:1.1.1.1"],
                             "drop_aaaa_nth": 1})
    assert s.ask("keydb-0.keydb").msg.header.rcode == RCODE.NOTIMP  # the flag wins
    assert str(s.ask("a.test").msg.rr[0].rdata) == "1.1.1.1"
    assert s.ask("a.test", "AAAA", timeout=DROP_TIMEOUT) is None  # nth=1 from the file
    s.config.write_text(json.dumps({"records": ["a.test=A:2.2.2.2"], "drop_aaaa_nth": 1,
                                    "zones": ["test"]}))
    s.signal(signal.SIGHUP)
    assert str(s.ask("a.test").msg.rr[0].rdata) == "2.2.2.2"
    assert s.ask("b.test").msg.header.rcode == RCODE.NXDOMAIN  # new zone
    assert s.ask("keydb-0.keydb").msg.header.rcode == RCODE.NOTIMP  # flag still wins
    assert s.ask("a.test", "AAAA", timeout=DROP_TIMEOUT) is None  # counters were reset
    s.config.write_text("{not json")
    s.signal(signal.SIGHUP)
    assert str(s.ask("a.test").msg.rr[0].rdata) == "2.2.2.2"  # bad file: old config kept
    assert s.proc.poll() is None


def test_sigterm_exits_cleanly(start_server):
    s = start_server()
    assert s.ask("keydb-0.keydb") is not None
    t0 = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t0 < 3
    assert not s.ready.exists()  # removed on a clean exit
    assert len(s.entries()) == 1
    assert b"Traceback" not in s.proc.stderr.read()


def test_sigint_exits_cleanly(start_server):
    s = start_server()
    s.signal(signal.SIGINT)
    assert s.proc.wait(5) == 0


def test_bad_config_exits_with_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gdbdiag.lab.dns", "--port", "0",
                           "--log", str(tmp_path / "l"), "--record", "x=MX:1"],
                          cwd=REPO, capture_output=True, timeout=10)
    assert proc.returncode == 2 and b"not supported" in proc.stderr
