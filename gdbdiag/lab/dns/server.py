"""The asyncio glue: UDP (with kernel receive timestamps) and TCP on one port, signals
applied in arrival order with respect to queries, the log written and flushed per query."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from .answer import Faults, handle_query
from .config import Config, ConfigError, load_config


def _client(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _UDP:
    """The UDP side, read with recvmsg() so each query carries its kernel arrival time.

    SO_TIMESTAMPNS stamps a datagram when it reaches the socket, not when the loop gets
    round to it: a parallel A+AAAA pair (sendmmsg) arrives before the A answer leaves,
    a serial pair after it, and the log's ``rx``/``tx`` tell the two apart.
    """

    def __init__(self, server: "DNSServer", sock: socket.socket, loop):
        self.server, self.sock, self.loop = server, sock, loop
        self._closing = False
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self):
        for _ in range(64):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors queued on the socket: nothing to do
                continue
            rx = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= 16:
                    sec, nsec = struct.unpack("qq", payload[:16])
                    rx = sec + nsec / 1e9
            self.server._on_udp(self, data, addr, rx)

    def sendto(self, data: bytes, addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            pass  # a full send buffer loses the answer, as UDP may

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


class DNSServer:
    """The asyncio server: UDP (and TCP) sockets, the log file, signals, config reloads.

    ``overrides`` are the config keys given on the command line; they win over the
    config file on every (re)load.
    """

    def __init__(self, config: Config, *, listen: str, port: int, log_path: str,
                 config_path: str | None = None, overrides: Mapping[str, Any] | None = None,
                 ready_file: str | None = None, tcp: bool = True):
        self.config = config
        self.faults = Faults()
        self.listen = listen
        self.port = port
        self.log_path = log_path
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.ready_file = ready_file
        self.tcp = tcp
        self._log = None
        self._udp: _UDP | None = None
        self._tcp_server: asyncio.base_events.Server | None = None
        self._tcp_tasks: set[asyncio.Task] = set()
        self._pending: set[asyncio.TimerHandle] = set()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Written only by the signal handlers / only by the loop: no lost updates.
        self._usr1_received = self._usr1_applied = 0
        self._hup_received = self._hup_applied = 0

    # -- set-up ------------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket | None]:
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(self.listen).version == 6 else socket.AF_INET
        except ValueError:
            raise ConfigError(f"--listen {self.listen!r}: expected an IP address") from None
        for _ in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.listen, self.port))
            port = udp.getsockname()[1]
            if not self.tcp:
                return udp, None
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.listen, port))
            except OSError as exc:
                tcp.close()
                udp.close()
                if exc.errno == errno.EADDRINUSE and self.port == 0:
                    continue  # ephemeral UDP port taken for TCP: pick another
                raise
            tcp.listen(64)
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    async def start(self) -> int:
        """Bind, install signal handlers, open the log, write the ready file; return the port."""
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ready_file)
        # Python-level handlers run in the main thread as soon as the signal arrives
        # (before the loop reads the next datagram), so signals and queries are seen in
        # arrival order; the handlers only bump counters, applied by the loop.
        signal.signal(signal.SIGUSR1, self._sig_usr1)
        signal.signal(signal.SIGHUP, self._sig_hup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        udp_sock, tcp_sock = self._bind()
        self.port = udp_sock.getsockname()[1]
        if self.log_path == "-":
            self._log = sys.stdout
        else:
            self._log = open(self.log_path, "a", encoding="utf-8")
        self._udp = _UDP(self, udp_sock, loop)
        if tcp_sock is not None:
            self._tcp_server = await asyncio.start_server(self._on_tcp, sock=tcp_sock)
        self.faults = Faults(started=time.time())
        if self.ready_file:
            info = {"pid": os.getpid(), "listen": self.listen, "port": self.port,
                    "tcp": tcp_sock is not None, "started": self.faults.started}
            tmp = f"{self.ready_file}.{os.getpid()}.tmp"
            Path(tmp).write_text(json.dumps(info) + "\n", encoding="utf-8")
            os.replace(tmp, self.ready_file)
        self._note(f"listening on {self.listen} port {self.port} "
                   f"(udp{'+tcp' if tcp_sock else ''}); config {json.dumps(self.config.to_dict())}")
        return self.port

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`), then close everything."""
        if self._loop is None:
            await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def close(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        if self._udp is not None:
            self._udp.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for task in list(self._tcp_tasks):
            task.cancel()
        if self._tcp_tasks:
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
        if self._tcp_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp_server.wait_closed(), 1)
        if self._log is not None and self._log is not sys.stdout:
            self._log.close()
        self._log = None
        if self.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ready_file)
        self._note("stopped")

    # -- signals and reloads -----------------------------------------------------------

    def _sig_usr1(self, signum, frame):
        self._usr1_received += 1
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._apply_signals)

    def _sig_hup(self, signum, frame):
        self._hup_received += 1
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._apply_signals)

    def _apply_signals(self) -> None:
        """Apply signals received so far; called before each query and after each signal."""
        if self._hup_received != self._hup_applied:
            self._hup_applied = self._hup_received
            self.reload()
        n = self._usr1_received - self._usr1_applied
        if n:
            self._usr1_applied += n
            self.faults.arm(n)
            self._note(f"SIGUSR1: armed, next {self.faults.armed} matching AAAA answer(s) will be dropped")

    def reload(self) -> bool:
        """Re-read the config file (flags still win); reset the fault counters, keep arms."""
        if not self.config_path:
            self._note("SIGHUP: no --config file; nothing to reload")
            return False
        try:
            self.config = load_config(self.config_path, self.overrides)
        except (OSError, ValueError) as exc:
            self._note(f"SIGHUP: reload failed, keeping the old config: {exc}")
            return False
        self.faults = Faults(started=time.time(), armed=self.faults.armed)
        self._note(f"SIGHUP: reloaded {self.config_path}: {json.dumps(self.config.to_dict())}")
        return True

    # -- queries -----------------------------------------------------------------------

    def _note(self, msg: str) -> None:
        print(f"gdbdiag.lab.dns[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)

    def _write_log(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def _handle(self, data: bytes, client: str, proto: str,
                rx: float | None = None) -> tuple[bytes | None, dict]:
        self._apply_signals()
        return handle_query(data, client=client, proto=proto, config=self.config,
                            faults=self.faults, rx=rx)

    def _on_udp(self, transport, data: bytes, addr, rx: float | None = None) -> None:
        reply, record = self._handle(data, _client(addr), "udp", rx)
        if reply is None:
            self._write_log(record)
        elif record["delay_ms"] > 0:
            handle = self._loop.call_later(record["delay_ms"] / 1000.0, self._send_delayed,
                                           transport, reply, addr, record)
            self._pending.add(handle)
        else:
            self._send_udp(transport, reply, addr, record)

    def _send_udp(self, transport, reply: bytes, addr, record: dict[str, Any]) -> None:
        if not transport.is_closing():
            # stamped just before the send: on a veth the client may answer before
            # sendto() even returns, and a serial AAAA must never look earlier than this
            record["tx"] = time.time()
            transport.sendto(reply, addr)
            self._write_log(record)

    def _send_delayed(self, transport, reply: bytes, addr, record: dict[str, Any]) -> None:
        self._pending = {h for h in self._pending if not h.cancelled() and h.when() > self._loop.time()}
        self._send_udp(transport, reply, addr, record)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._tcp_tasks.add(task)
        client = _client(writer.get_extra_info("peername"))
        try:
            while True:
                try:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                reply, record = self._handle(data, client, "tcp")
                if reply is None:
                    self._write_log(record)
                    continue
                if record["delay_ms"] > 0:
                    await asyncio.sleep(record["delay_ms"] / 1000.0)
                record["tx"] = time.time()
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
                self._write_log(record)
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.close()
