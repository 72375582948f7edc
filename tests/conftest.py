from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

FINDING_RE = re.compile(r"\[gdbdiag\]\s+\+\s*[\d.]+s LWP (\d+)(?: \(([^)]*)\))? (\w+): (.*)")


def findings(text: str) -> list[dict]:
    """The `[gdbdiag] ... kind: ...` lines a trace printed, parsed."""
    out = []
    for m in FINDING_RE.finditer(text):
        out.append({"lwp": int(m.group(1)), "thread": m.group(2), "kind": m.group(3),
                    "text": m.group(4).strip()})
    return out


def tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def gdb_attach():
    """Attach an interactive gdb (pexpect) with the plugin and the target's own verified
    symbols; always untrace + detach + quit at teardown, then check nothing is left."""
    from gdbdiag.gdbdrive import Gdb, setup_commands

    sessions = []

    def attach(pid: int, **kw):
        cmds, info = setup_commands(pid)
        assert info["ok"], info["fetch"]
        g = Gdb(pid, cmds, **kw)
        sessions.append((g, pid))
        return g

    yield attach
    release_gdb_sessions(sessions)


def release_gdb_sessions(sessions, code=("libc", "libresolv", "libnss_dns")):
    """Close every (Gdb, pid); each target must end untraced with its code as on disk."""
    from gdbdiag.codecheck import diff_code
    for g, pid in sessions:
        g.close()
        deadline = time.monotonic() + 5
        while tracer_of(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tracer_of(pid) == 0, "gdb left the target traced"
        assert diff_code(pid, code) == [], "code bytes changed"
