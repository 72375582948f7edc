"""Which processes a scan reads: every process of /proc (the node), ``--pid``, or the
processes of ``--container`` IDs or names.

Containers are found the way the runtimes record them, read-only:

* runc state files ``<root>/<id>/state.json`` (``init_process_pid``,
  ``init_process_start``) under the usual roots — runc and podman (``/run/runc``), the
  gdbdiag lab (``/run/gdbdiag/runc``), containerd (``/run/containerd/runc/<namespace>``),
  Docker (``/run/docker/runtime-runc/<namespace>``) — plus any ``--runc-root``;
* podman's names (``/var/lib/containers/storage/overlay-containers/containers.json``);
* else the ID as a component of ``/proc/PID/cgroup`` paths (``…/cri-containerd-<id>.scope``,
  ``…/docker-<id>.scope``, ``/libpod_parent/libpod-<id>``, ``/kubepods/…/<id>``), the way
  ``gdbdiag attach --container-id`` does.

A container's processes: those in its init's PID namespace when it has its own,
else those in its cgroup. Membership is re-read at every pass (``--watch``).
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

from ..errors import EXIT_REFUSED, EXIT_USAGE, GdbdiagError
from ..procfs import read_stat, read_text

RUNC_ROOTS = ("/run/runc", "/run/gdbdiag/runc", "/run/containerd/runc/*",
              "/run/docker/runtime-runc/*")
PODMAN_CONTAINERS = ("/var/lib/containers/storage/overlay-containers/containers.json",)
_HEX_ID = re.compile(r"[0-9a-f]{12,64}")
_ID_WRAPPERS = re.compile(r"^(?:cri-containerd-|docker-|libpod-|crio-|containerd-)|\.scope$")


@dataclass
class Container:
    id: str
    name: str | None = None
    source: str = "cgroup"                 # "runc:<root>" | "cgroup"
    init_pid: int | None = None
    pidns: str | None = None               # "pid:[4026532…]" of its init, when its own
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "source": self.source,
                "init_pid": self.init_pid, "pidns": self.pidns}


def all_pids() -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _host_pidns() -> str | None:
    return pid_ns(os.getpid())


def runc_states(extra_roots=()) -> list[dict]:
    """Every runc container state found: {id, root, init_pid, init_start}."""
    out, seen = [], set()
    for pattern in list(RUNC_ROOTS) + list(extra_roots):
        for root in sorted(glob.glob(pattern)):
            try:
                names = os.listdir(root)
            except OSError:
                continue
            for cid in names:
                p = os.path.join(root, cid, "state.json")
                if p in seen:
                    continue
                seen.add(p)
                try:
                    with open(p) as f:
                        st = json.load(f)
                except (OSError, ValueError):
                    continue
                if not isinstance(st, dict):
                    continue
                out.append({"id": st.get("id") or cid, "root": root,
                            "init_pid": st.get("init_process_pid"),
                            "init_start": st.get("init_process_start")})
    return out


def podman_names(paths=PODMAN_CONTAINERS) -> dict[str, str]:
    out = {}
    for p in paths:
        try:
            with open(p) as f:
                entries = json.load(f)
        except (OSError, ValueError):
            continue
        for c in entries if isinstance(entries, list) else []:
            for n in c.get("names") or []:
                out[n] = c.get("id")
    return out


def _live_init(st: dict) -> int | None:
    """The state's init PID if it is still that process (start time matches)."""
    pid = st.get("init_pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    s = read_stat(pid)
    if s is None or s["state"] in ("Z", "X"):
        return None
    if st.get("init_start") is not None and s["starttime"] != st["init_start"]:
        return None
    return pid


def _container_of_state(st: dict, name: str | None = None) -> Container:
    c = Container(id=st["id"], name=name, source=f"runc:{st['root']}")
    c.init_pid = _live_init(st)
    if c.init_pid is None:
        c.notes.append("its init process is not running")
    else:
        ns = pid_ns(c.init_pid)
        c.pidns = ns if ns and ns != _host_pidns() else None
    return c


def _cgroup_components(pid: int) -> list[str]:
    text = read_text(f"/proc/{pid}/cgroup") or ""
    comps = []
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        comps += [c for c in path.split("/") if c]
    return comps


def _cgroup_has(comps: list[str], cid: str) -> bool:
    for c in comps:
        bare = _ID_WRAPPERS.sub("", c)
        if c == cid or bare == cid or (len(cid) >= 12 and _HEX_ID.fullmatch(bare) and bare.startswith(cid)):
            return True
    return False


def resolve(specs: list[str], extra_roots=()) -> list[Container]:
    """Containers for IDs or names; a spec that matches nothing, or more than one
    container, is an error (one line, nothing done)."""
    states = runc_states(extra_roots)
    names = podman_names()
    out: list[Container] = []
    for spec in specs:
        spec = spec.split("://", 1)[-1].strip()
        if not spec or "/" in spec or len(spec) > 256:
            raise GdbdiagError(f"--container {spec!r}: not a container ID or name", EXIT_USAGE)
        exact = [s for s in states if s["id"] == spec]
        if not exact and spec in names:
            exact = [s for s in states if s["id"] == names[spec]]
            if not exact:       # podman knows the name, runc state elsewhere: use the cgroup
                out.append(Container(id=names[spec], name=spec, source="cgroup"))
                continue
        if not exact and len(spec) >= 4:
            exact = [s for s in states if s["id"].startswith(spec)]
        if len({s["id"] for s in exact}) > 1:
            raise GdbdiagError(f"--container {spec!r} matches {len(exact)} containers: "
                               + ", ".join(sorted(s["id"][:20] for s in exact)), EXIT_USAGE)
        if exact:
            out.append(_container_of_state(exact[0], name=spec if spec != exact[0]["id"] else None))
            continue
        if len(spec) >= 12 and any(_cgroup_has(_cgroup_components(p), spec) for p in all_pids()):
            out.append(Container(id=spec, source="cgroup"))
            continue
        roots = ", ".join(list(RUNC_ROOTS) + list(extra_roots))
        raise GdbdiagError(f"no container {spec!r}: not a runc container under {roots}, not a "
                           "podman name, and no process has it in its cgroup", EXIT_REFUSED)
    return out


def members(c: Container, pids: list[int]) -> list[int]:
    """The processes of container ``c`` among ``pids``."""
    if c.pidns:
        return [p for p in pids if pid_ns(p) == c.pidns]
    return [p for p in pids if _cgroup_has(_cgroup_components(p), c.id)]


class Selection:
    """What one pass reads: ``select()`` -> [(pid, container or None)], re-evaluated at
    every call (processes come and go; containers start new ones)."""

    def __init__(self, pids: list[int] | None = None, containers: list[str] | None = None,
                 extra_roots=()):
        self.pids = sorted(set(pids or []))
        for p in self.pids:
            if p <= 0:
                raise GdbdiagError(f"--pid {p}: not a process ID", EXIT_USAGE)
        self.containers = resolve(containers, extra_roots) if containers else []
        self.extra_roots = tuple(extra_roots)
        self.node = not self.pids and not self.containers
        missing = [p for p in self.pids if not os.path.isdir(f"/proc/{p}")]
        if missing and not self.containers and len(missing) == len(self.pids):
            raise GdbdiagError("no such process: " + ", ".join(map(str, missing)), EXIT_REFUSED)
        self._index: dict[str, str] = {}

    @property
    def mode(self) -> str:
        return "node" if self.node else "+".join(
            m for m, on in (("pids", self.pids), ("containers", self.containers)) if on)

    def describe(self) -> dict:
        return {"mode": self.mode, "pids": self.pids,
                "containers": [c.to_dict() for c in self.containers]}

    def select(self) -> list[tuple[int, str | None]]:
        every = all_pids()
        chosen: dict[int, str | None] = {}
        if self.node:
            names = self._runc_index()
            for p in every:
                chosen[p] = names.get(pid_ns(p)) if names else None
        for p in self.pids:
            chosen[p] = None
        for c in self.containers:
            for p in members(c, every):
                chosen[p] = c.name or c.id
        return sorted(chosen.items())

    def _runc_index(self) -> dict[str, str]:
        """PID namespace -> runc container id, for naming containers in a node scan."""
        idx = {}
        host = _host_pidns()
        for st in runc_states(self.extra_roots):
            pid = _live_init(st)
            ns = pid_ns(pid) if pid else None
            if ns and ns != host:
                idx[ns] = st["id"]
        return idx
