"""Host side: drive an interactive gdb attached to a target, with the plugin loaded.

pexpect runs gdb the way a person would (glibc's pretty-printer tests do the same): a
unique prompt, one command at a time, ``continue &`` so the target runs while the probes
report, ``interrupt`` to stop it again. ``close()`` always removes the probes and
detaches before gdb exits, so the target keeps running with its own code bytes.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pexpect

from .errors import GdbdiagError

LOADER = Path(__file__).resolve().parent / "gdb" / "loader.py"
PROMPT = "(gdbdiag-gdb) "
_PROMPT_RE = re.escape(PROMPT)


OUTPUT_KEEP = 1 << 20


class GdbError(GdbdiagError, RuntimeError):
    pass


def setup_commands(pid: int, offline: bool = False, log=None) -> tuple[list[str], dict]:
    """gdb settings that make it load exactly the target's glibc and its debug files."""
    from .symbols import identify, gdbload
    from .symbols.cache import SymbolCache, default_cache_dir
    from .symbols.sources import Settings, fetch_symbols
    ident = identify.identify_process(pid)
    cache = SymbolCache(default_cache_dir())
    res = fetch_symbols(ident, Settings(offline=offline, progress=False), cache)
    cmds = gdbload.gdb_setup_commands(ident, cache.debug_dir)
    return cmds, {"ident": ident, "fetch": res.to_dict(), "ok": res.ok}


class Gdb:
    def __init__(self, pid: int, setup: list[str] | None = None, gdb: str = "gdb",
                 timeout: float = 60.0, logfile=None, env: dict | None = None):
        self.pid = pid
        self.timeout = timeout
        argv = ["-nx", "-q", "-iex", "set pagination off", "-iex", "set width 0",
                "-iex", "set confirm off", "-iex", f"set prompt {PROMPT}"]
        for c in setup or []:
            argv += ["-iex", c]
        argv += ["-ex", f"source {LOADER}", "-ex", "set resolv color off"]
        e = dict(os.environ)
        if env:
            e.update(env)
        e["TERM"] = "dumb"
        self.child = pexpect.spawn(shutil.which(gdb) or gdb, argv, encoding="utf-8",
                                   codec_errors="replace", timeout=timeout, env=e,
                                   dimensions=(200, 400))
        if logfile is not None:
            self.child.logfile_read = logfile
        self.output = ""
        self._expect_prompt()
        self.running = False
        out = self.cmd(f"attach {pid}", timeout=timeout)
        if "ptrace: " in out or "Can't attach" in out or "Operation not permitted" in out:
            raise GdbError(out.strip().splitlines()[-1])
        self.attached = True

    def _keep(self, text: str) -> None:
        """What gdb printed, the last OUTPUT_KEEP characters of it (a day-long run must
        not grow the runner's memory; the runner reads the event stream, not this)."""
        self.output = (self.output + text)[-OUTPUT_KEEP:]

    def _expect_prompt(self, timeout=None) -> str:
        self.child.expect(_PROMPT_RE, timeout=timeout or self.timeout)
        text = self.child.before
        self._keep(text)
        return text

    def cmd(self, line: str, timeout: float | None = None) -> str:
        """Run one command while the target is stopped; return what it printed."""
        self.child.sendline(line)
        return self._expect_prompt(timeout)

    def cont(self) -> None:
        """Let the target run in the background; probes keep reporting."""
        self.child.sendline("continue &")
        self._expect_prompt()
        self.running = True

    def read_until(self, pattern: str, timeout: float) -> str:
        """Read the running session's output until ``pattern`` (regex) appears."""
        self.child.expect(pattern, timeout=timeout)
        text = self.child.before + self.child.after
        self._keep(text)
        return text

    def drain(self, seconds: float) -> str:
        """Collect output for ``seconds`` while the target runs."""
        end = time.monotonic() + seconds
        chunks = []
        while time.monotonic() < end:
            try:
                chunks.append(self.child.read_nonblocking(65536, timeout=min(0.5, end - time.monotonic())))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                break
        text = "".join(chunks)
        self._keep(text)
        return text

    def interrupt(self) -> str:
        if not self.running:
            return ""
        self.child.sendline("interrupt")
        # the prompt comes back at once; the stop notice follows it
        self.child.expect(r"(received signal SIGINT|Program received signal|\bstopped\.)",
                          timeout=self.timeout)
        self._keep(self.child.before + self.child.after)
        self.running = False
        self.child.sendline("echo __gdbdiag_sync__\\n")
        self.child.expect("__gdbdiag_sync__\r?\n", timeout=self.timeout)
        text = self.child.before
        self._expect_prompt()
        return text

    def close(self) -> None:
        """Untrace, detach, quit — in that order, whatever state gdb is in."""
        if not self.child.isalive():
            return
        try:
            if self.running:
                self.interrupt()
            self.cmd("resolv untrace", timeout=30)
            self.cmd("detach", timeout=30)
            self.child.sendline("quit")
            self.child.expect(pexpect.EOF, timeout=15)
        except (pexpect.TIMEOUT, pexpect.EOF, OSError):
            pass
        finally:
            if self.child.isalive():
                # last resort: SIGTERM makes gdb detach (gdb kills only what it started)
                self.child.kill(signal.SIGTERM)
                time.sleep(0.5)
            if self.child.isalive():
                self.child.terminate(force=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
