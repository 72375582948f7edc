"""Host side: are the target's code pages byte-for-byte its files on disk?

After a debugger leaves, every executable mapping of a file must hold exactly that
file's bytes: a leftover int3 (0xCC) from a breakpoint kills the process at its next
pass. Files are read as the target sees them (/proc/PID/map_files/…), so a container's
libc is compared with the container's libc, never the host's.
"""
from __future__ import annotations


def exec_mappings(pid: int) -> list[dict]:
    out = []
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            parts = line.split(None, 5)
            if len(parts) < 6 or "x" not in parts[1] or not parts[5].strip().startswith("/"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append({"start": lo, "end": hi, "offset": int(parts[2], 16),
                        "path": parts[5].strip(), "range": parts[0]})
    return out


def diff_code(pid: int, only: tuple[str, ...] | None = None, limit: int = 20) -> list[dict]:
    """Differences between executable mappings and their files (empty = identical).

    ``only``: substrings of paths to check (e.g. ("libc", "libresolv")); default all."""
    diffs = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for m in exec_mappings(pid):
            if only and not any(s in m["path"] for s in only):
                continue
            try:
                fh = open(f"/proc/{pid}/map_files/{m['range']}", "rb")
            except OSError as exc:
                diffs.append({"path": m["path"], "error": f"cannot open mapped file: {exc}"})
                continue
            with fh:
                fh.seek(m["offset"])
                want = fh.read(m["end"] - m["start"])
            mem.seek(m["start"])
            got = mem.read(len(want))
            if got == want:
                continue
            for i, (a, b) in enumerate(zip(got, want)):
                if a != b:
                    diffs.append({"path": m["path"], "addr": m["start"] + i, "mem": a, "file": b})
                    if len(diffs) >= limit:
                        return diffs
    return diffs
