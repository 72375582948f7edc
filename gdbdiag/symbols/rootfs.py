"""Resolve paths inside a foreign root filesystem without ever leaving it.

A container image (or a process's ``/proc/PID/root``) is full of symlinks written for
*its* root: ``lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-2.31.so``,
``etc/os-release -> ../usr/lib/os-release``.  Following them with the host's
``open()`` resolves absolute targets against the host's ``/`` — wrong file at best,
a host secret at worst.  :class:`SafeRoot` walks each component itself with
directory file descriptors (``O_PATH | O_NOFOLLOW``), re-roots absolute link targets
at the image root, clamps ``..`` at the root and gives up after ``max_links`` links
(``ELOOP``), so a path can never escape the root, not even through a race.
"""
from __future__ import annotations

import errno
import os
import stat

from ..errors import GdbdiagError

__all__ = ["SafeRoot", "EscapeError"]

_O_PATH = getattr(os, "O_PATH", 0o10000000)


class EscapeError(GdbdiagError, OSError):
    """Raised for a path that cannot be resolved inside the root (loops, bad names).
    An OSError too (``EscapeError(errno, message)``): callers treat it as one."""

    def __init__(self, err: int, message: str):
        OSError.__init__(self, err, message)


def _split(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


class SafeRoot:
    """A host directory that is treated as ``/`` for path resolution.

    ``root`` may be any directory, including ``/proc/PID/root`` (the kernel follows
    that magic link to the process's root, even in another mount namespace).
    """

    def __init__(self, root: str = "/", max_links: int = 40):
        self.root = os.path.abspath(root) if root else "/"
        self.max_links = max_links

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"SafeRoot({self.root!r})"

    # -- core walk --------------------------------------------------------------
    def _walk(self, path: str, follow_last: bool = True):
        """Walk ``path``; return (parent_fd_stack, resolved_components, last_name).

        The caller owns the fds in the stack and must close them (``_close``).
        ``last_name`` is None when the path resolves to the root itself.
        """
        root_fd = os.open(self.root, _O_PATH | os.O_DIRECTORY)
        stack = [root_fd]       # fds of directories: root, then each resolved component
        names: list[str] = []   # resolved components (inside the root)
        todo = _split(path)
        links = 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                        names.pop()
                    continue
                cur = stack[-1]
                last = not todo
                try:
                    st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    if last:
                        return stack, names, comp
                    raise
                if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                    links += 1
                    if links > self.max_links:
                        raise EscapeError(errno.ELOOP, f"too many levels of symbolic links in {path!r} (limit {self.max_links})")
                    target = os.readlink(comp, dir_fd=cur)
                    if not target:
                        raise EscapeError(errno.ENOENT, f"empty symlink in {path!r}")
                    if target.startswith("/"):
                        # re-root: an absolute link is relative to the image root
                        while len(stack) > 1:
                            os.close(stack.pop())
                        names.clear()
                    todo = _split(target) + todo
                    continue
                if last:
                    return stack, names, comp
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, f"not a directory: /{'/'.join(names + [comp])}")
                fd = os.open(comp, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
                stack.append(fd)
                names.append(comp)
            return stack, names, None
        except BaseException:
            self._close(stack)
            raise

    @staticmethod
    def _close(stack):
        for fd in stack:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- public API ---------------------------------------------------------------
    def resolve(self, path: str, strict: bool = True, follow_last: bool = True) -> str:
        """Canonical absolute path of ``path`` *inside* the root (no symlinks left).

        With ``strict`` a missing final component raises FileNotFoundError.
        """
        stack, names, last = self._walk(path, follow_last=follow_last)
        try:
            if last is not None:
                if strict:
                    try:
                        os.stat(last, dir_fd=stack[-1], follow_symlinks=False)
                    except FileNotFoundError:
                        raise FileNotFoundError(errno.ENOENT, f"no such file in root {self.root}: {path}") from None
                names = names + [last]
            return "/" + "/".join(names)
        finally:
            self._close(stack)

    def host_path(self, path: str, strict: bool = True) -> str:
        """The host path of ``path`` (resolved inside the root) — for tools that need a
        path string (gdb, subprocesses).  Read file contents with :meth:`open` instead."""
        inner = self.resolve(path, strict=strict)
        if self.root == "/":
            return inner
        return self.root.rstrip("/") + inner if inner != "/" else self.root

    def to_host(self, inner: str) -> str:
        """Host path of an already resolved inner path (no resolution)."""
        return inner if self.root == "/" else self.root.rstrip("/") + inner

    def open(self, path: str, mode: str = "rb"):
        """Open a regular file inside the root for reading (never follows a link
        out of the root: the final open uses O_NOFOLLOW relative to its directory)."""
        if any(c in mode for c in "wax+"):
            raise ValueError("SafeRoot.open is read-only")
        stack, names, last = self._walk(path)
        try:
            if last is None:
                raise IsADirectoryError(errno.EISDIR, f"is the root: {path}")
            fd = os.open(last, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
        finally:
            self._close(stack)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"not a regular file: {path}")
            return os.fdopen(fd, mode)
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        with self.open(path) as f:
            return f.read() if limit is None else f.read(limit)

    def read_text(self, path: str, limit: int | None = 1 << 20, encoding="utf-8") -> str:
        return self.read_bytes(path, limit).decode(encoding, "replace")

    def stat(self, path: str) -> os.stat_result:
        stack, names, last = self._walk(path)
        try:
            if last is None:
                return os.fstat(stack[-1])
            return os.stat(last, dir_fd=stack[-1], follow_symlinks=False)
        finally:
            self._close(stack)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except (OSError, ValueError):
            return False

    def isfile(self, path: str) -> bool:
        try:
            return stat.S_ISREG(self.stat(path).st_mode)
        except (OSError, ValueError):
            return False

    def isdir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(self.stat(path).st_mode)
        except (OSError, ValueError):
            return False

    def listdir(self, path: str) -> list[str]:
        stack, names, last = self._walk(path)
        try:
            if last is None:
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=stack[-1])
            else:
                fd = os.open(last, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=stack[-1])
        finally:
            self._close(stack)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)
