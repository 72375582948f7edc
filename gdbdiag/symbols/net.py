"""HTTP GET with timeouts, hashing and a simple stderr progress bar (stdlib only)."""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import GdbdiagError

__all__ = ["FetchError", "NotFound", "Progress", "http_get", "http_download", "sha256_file"]

USER_AGENT = "gdbdiag-symbols/0.1 (+python-urllib)"


class FetchError(GdbdiagError):
    """A download failed; str() is a one-line cause."""


class NotFound(FetchError):
    """HTTP 404/410: the server answered, the file is not there."""


class Progress:
    """A one-line progress bar on stderr: ``label [#####     ]  45%  3.4/7.5 MB``.

    Drawn only when ``enabled`` (default: stderr is a terminal)."""

    def __init__(self, label: str, total: int | None, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.label = label if len(label) <= 40 else "…" + label[-39:]
        self.total = total
        self.done = 0
        self._last = 0.0
        self._drawn = False

    def update(self, n: int):
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (self.total is None or self.done < self.total):
            return
        self._last = now
        mb = self.done / 1e6
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 24)
            line = f"\r{self.label} [{bar:<24}] {frac * 100:3.0f}% {mb:5.1f}/{self.total / 1e6:.1f} MB"
        else:
            line = f"\r{self.label} {mb:5.1f} MB"
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True

    def close(self):
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def sha256_file(path: str) -> str:
    """The SHA256 (hex) of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe(url: str, e: BaseException, timeout: float) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason} for {url}"
    reason = getattr(e, "reason", e)
    if isinstance(reason, (socket.timeout, TimeoutError)) or isinstance(e, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g}s from {url}"
    if isinstance(reason, ConnectionRefusedError):
        return f"connection refused by {urllib.parse.urlsplit(url).netloc}"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve host {urllib.parse.urlsplit(url).hostname} ({reason.strerror})"
    if isinstance(reason, OSError) and reason.strerror:
        return f"{reason.strerror} ({url})"
    return f"{type(reason).__name__}: {reason} ({url})"


def _open(url: str, timeout: float):
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise FetchError(f"unsupported URL scheme: {url}")
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise NotFound(_describe(url, e, timeout)) from None
        raise FetchError(_describe(url, e, timeout)) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FetchError(_describe(url, e, timeout)) from None


def http_get(url: str, timeout: float = 30.0, max_bytes: int = 64 << 20) -> bytes:
    """Small GET into memory."""
    resp = _open(url, timeout)
    try:
        with resp:
            data = resp.read(max_bytes + 1)
    except (OSError, ValueError) as e:
        raise FetchError(_describe(url, e, timeout)) from None
    if len(data) > max_bytes:
        raise FetchError(f"{url} is larger than {max_bytes} bytes")
    return data


def http_download(url: str, dest: str, timeout: float = 30.0, expect_size: int | None = None,
                  expect_sha256: str | None = None, progress: bool | None = None,
                  deadline: float | None = None, label: str | None = None) -> str:
    """Stream ``url`` into the new file ``dest``; returns its SHA256 (hex).

    ``timeout`` bounds every socket operation; ``deadline`` (seconds, default
    ``max(120, 20*timeout)``) bounds the whole transfer.  A size or SHA256 mismatch
    raises FetchError and removes ``dest``."""
    if deadline is None:
        deadline = max(120.0, 20 * timeout)
    t0 = time.monotonic()
    resp = _open(url, timeout)
    h = hashlib.sha256()
    total = expect_size
    if total is None:
        try:
            total = int(resp.headers.get("Content-Length") or 0) or None
        except ValueError:
            total = None
    bar = Progress(label or os.path.basename(urllib.parse.urlsplit(url).path), total, enabled=progress)
    n = 0
    ok = False
    try:
        with resp, open(dest, "xb") as out:
            while True:
                try:
                    chunk = resp.read(1 << 16)
                except (OSError, ValueError) as e:
                    raise FetchError(_describe(url, e, timeout)) from None
                if not chunk:
                    break
                n += len(chunk)
                if expect_size is not None and n > expect_size:
                    raise FetchError(f"{url}: more than the expected {expect_size} bytes")
                h.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
                if time.monotonic() - t0 > deadline:
                    raise FetchError(f"{url}: transfer took longer than {deadline:g}s")
        if expect_size is not None and n != expect_size:
            raise FetchError(f"{url}: got {n} bytes, expected {expect_size}")
        digest = h.hexdigest()
        if expect_sha256 is not None and digest != expect_sha256.lower():
            raise FetchError(f"{os.path.basename(url)}: SHA256 mismatch (got {digest[:16]}…, "
                             f"signed index says {expect_sha256[:16]}…) — tampered or corrupt download, refused")
        ok = True
        return digest
    finally:
        bar.close()
        if not ok:
            try:
                os.unlink(dest)
            except FileNotFoundError:
                pass
