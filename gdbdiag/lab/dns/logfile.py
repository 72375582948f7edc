"""The server's query log (one JSON object per line) and ready file, read back."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete entries of a query log, oldest first; ``[]`` if it does not exist yet.

    A last line still being written (no newline yet) is skipped.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def wait_log(path: str | os.PathLike[str], predicate=lambda entries: bool(entries), *,
             timeout: float = 10.0, interval: float = 0.02) -> list[dict[str, Any]]:
    """Poll :func:`read_log` until ``predicate(entries)`` is true; return the entries.

    Raises ``TimeoutError`` (with the last entries) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        entries = read_log(path)
        if predicate(entries):
            return entries
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path}: condition not met after {timeout}s; entries: {entries}")
        time.sleep(interval)


def wait_ready(path: str | os.PathLike[str], *, timeout: float = 10.0, proc=None,
               interval: float = 0.02) -> dict[str, Any]:
    """Wait for a server's ``--ready-file`` and return it: ``{pid, listen, port, tcp, started}``

    (``started``: the unix time ``--drop-aaaa-after`` counts from).

    ``proc`` (a ``subprocess.Popen``) makes it fail fast if the server exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return json.loads(Path(path).read_text(encoding="utf-8"))
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"DNS server exited with status {proc.returncode} before {path}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"DNS server not ready after {timeout}s ({path})")
        time.sleep(interval)
