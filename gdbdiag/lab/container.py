"""Lab containers: a pod network namespace wired to a DNS namespace, and a runc container.

Layout of one lab called NAME (all of it removed by ``down``):

- network namespaces ``gdbdiag-NAME-pod`` and ``gdbdiag-NAME-dns`` joined by a veth pair;
  the pod side is 10.244.1.5, the DNS side 10.96.0.10 (the incident's kube-dns address).
  Both addresses exist only inside those namespaces: the pod has no route anywhere else.
- the CoreDNS-like server (``gdbdiag.lab.dns``) in the DNS namespace, on port 53.
- an overlay mount (the cached root filesystem as its read-only lower layer) as the
  container's root, so any number of labs share one rootfs build and never change it.
- a runc container (OCI bundle generated here) with its own mount, PID, UTS and IPC
  namespaces, joining the pod network namespace by path like a Kubernetes pod does.
- state in ``/run/gdbdiag/labs/NAME/`` (state.json, bundle, logs).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import rootfs as rootfs_mod
from .errors import LabError
from .oci import oci_config
from .procs import pid_alive, pid_matches, run, start_time, tail, wait_until

STATE_ROOT = Path(os.environ.get("GDBDIAG_LAB_STATE", "/run/gdbdiag/labs"))
RUNC_ROOT = Path(os.environ.get("GDBDIAG_RUNC_ROOT", "/run/gdbdiag/runc"))
DNS_ADDR = "10.96.0.10"
POD_ADDR = "10.244.1.5"
SEARCH = "default.svc.cluster.local svc.cluster.local cluster.local"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
WORKLOADS = ("redis", "resolver")
RCODES = ("SERVFAIL", "REFUSED", "NOTIMP")
DEFAULT_NAMES = ("keydb-0.keydb", "keydb-2.keydb")


@dataclass
class LabSpec:
    name: str = "lab"
    release: str | None = "bullseye"
    rootfs: str | None = None          # user image: directory or tarball
    workload: str | None = "redis"
    cmd: str | None = None             # user command (with rootfs, or on a release)
    fault: str = "drop-aaaa-once"
    fault_match: str | None = None
    rcode: str = "SERVFAIL"
    error_style: str = "echo"
    names: tuple[str, ...] = DEFAULT_NAMES  # resolver workload: one thread per name
    interval: float = 1.0                   # resolver workload: seconds between lookups
    resolv_options: str = ""                # extra `options` for resolv.conf (e.g. single-request)
    records: tuple[str, ...] = ()           # NAME=A:1.2.3.4 for the DNS server
    hostname: str = "keydb-1"
    cache: str | None = None


@dataclass
class Lab:
    """A running lab as recorded in its state file."""
    name: str
    state_dir: str
    release: str | None = None
    rootfs: str | None = None
    workload: str | None = None
    pid: int | None = None
    runc_id: str | None = None
    netns_pod: str | None = None
    netns_dns: str | None = None
    veth_pod: str | None = None
    veth_dns: str | None = None
    dns_pid: int | None = None
    dns_start: int | None = None
    dns_addr: str = DNS_ADDR
    pod_addr: str = POD_ADDR
    dns_log: str | None = None
    workload_log: str | None = None
    out_dir: str | None = None
    merged: str | None = None
    fault: str | None = None
    rcode: str | None = None
    created: float = field(default_factory=time.time)

    # -- persistence ---------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return Path(self.state_dir) / "state.json"

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.rename(self.state_file)

    @classmethod
    def load(cls, name: str) -> "Lab":
        path = STATE_ROOT / name / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} (see `gdbdiag lab list`)") from None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> dict:
        return {"name": self.name, "pid": self.pid, "release": self.release,
                "rootfs": self.rootfs, "workload": self.workload, "dns_log": self.dns_log,
                "workload_log": self.workload_log, "out_dir": self.out_dir,
                "netns": self.netns_pod, "dns": f"{self.dns_addr}:53",
                "fault": self.fault, "rcode": self.rcode, "state_dir": self.state_dir}

    # -- helpers for tests and the CLI ------------------------------------------------
    def dns_records(self) -> list[dict]:
        from .dns import read_log
        return read_log(self.dns_log) if self.dns_log and os.path.exists(self.dns_log) else []

    def workload_records(self) -> list[dict]:
        """JSON lines the resolver workload wrote (one per lookup)."""
        path = Path(self.out_dir or "") / "lookups.jsonl"
        out = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def inject(self, sig: int = signal.SIGUSR1) -> None:
        """Arm the DNS server to drop the next matching AAAA answer (fault injection now)."""
        if not pid_matches(self.dns_pid, self.dns_start):
            raise LabError(f"lab {self.name}: DNS server is not running")
        os.kill(self.dns_pid, sig)

    def alive(self) -> bool:
        return bool(self.pid) and pid_alive(self.pid)

    def probe(self, seconds: float = 30.0, interval: float = 0.1, emit=None,
              port: int = 6379, write: bool = False) -> list[dict]:
        """Run the Redis latency probe (or, ``write``, a writer) inside the pod's netns."""
        argv = ["ip", "netns", "exec", self.netns_pod, sys.executable, "-m", "gdbdiag.lab.probe",
                "--seconds", str(seconds), "--interval", str(interval), "--port", str(port)]
        if write:
            argv.append("--write")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        records = []
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, env=env) as p:
            try:
                for line in p.stdout:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if "summary" in rec:
                        continue
                    records.append(rec)
                    if emit:
                        emit(rec)
            finally:
                if p.poll() is None:
                    p.terminate()
        return records

    def redis_dbsize(self, port: int = 6379) -> int:
        r = subprocess.run(["ip", "netns", "exec", self.netns_pod, sys.executable, "-m",
                            "gdbdiag.lab.probe", "--dbsize", "--port", str(port)],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
        if r.returncode != 0:
            raise LabError(f"DBSIZE failed: {r.stderr.strip()[-200:]}")
        return json.loads(r.stdout)["dbsize"]


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, runc)")
    for tool in ("ip", "runc"):
        if not shutil.which(tool):
            raise LabError(f"{tool} is not installed (run scripts/setup)")


def list_labs() -> list[Lab]:
    if not STATE_ROOT.exists():
        return []
    labs = []
    for d in sorted(STATE_ROOT.iterdir()):
        try:
            labs.append(Lab.load(d.name))
        except (LabError, ValueError, TypeError):
            continue
    return labs


def parse_fault(fault: str) -> list[str]:
    """Map a --fault value to DNS-server flags."""
    if fault in ("none", "", None):
        return []
    if fault == "drop-aaaa-once":
        return ["--drop-aaaa-nth", "1"]
    m = re.fullmatch(r"drop-aaaa-nth:(\d+)", fault)
    if m and int(m.group(1)) >= 1:
        return ["--drop-aaaa-nth", m.group(1)]
    m = re.fullmatch(r"drop-aaaa-after:(\d+(?:\.\d+)?)", fault)
    if m:
        return ["--drop-aaaa-after", m.group(1)]
    m = re.fullmatch(r"delay:(\d+)", fault)
    if m:
        return ["--delay-ms", m.group(1)]
    if fault == "drop-all":
        return ["--drop-all"]
    raise LabError(f"unknown fault {fault!r} (drop-aaaa-once, drop-aaaa-nth:N, "
                   "drop-aaaa-after:SECONDS, delay:MS, drop-all, none)")


def _workload_argv(spec: LabSpec) -> tuple[list[str], str]:
    """The container's init process and the log line that says it is ready."""
    if spec.cmd:
        return ["/bin/sh", "-c", spec.cmd], ""
    if spec.workload == "redis":
        return (["redis-server", "--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no",
                 "--save", "", "--appendonly", "no", "--dir", "/tmp", "--daemonize", "no",
                 "--replicaof", "keydb-0.keydb", "6379", "--replica-read-only", "no",
                 "--logfile", ""],
                "Ready to accept connections")
    if spec.workload == "resolver":
        return (["python3", "-u", "/opt/gdbdiag/resolver.py", "--interval", str(spec.interval),
                 "--out", "/gdbdiag-out/lookups.jsonl", *spec.names],
                "resolver: started")
    raise LabError(f"unknown workload {spec.workload!r} (choose from {', '.join(WORKLOADS)})")


def up(spec: LabSpec, log=None) -> Lab:
    """Start a lab; on any failure, remove whatever was created and raise LabError."""
    log = log or (lambda msg: None)
    _require_root()
    if not NAME_RE.match(spec.name):
        raise LabError(f"bad lab name {spec.name!r}: lower-case letters, digits and '-', "
                       "at most 24 characters")
    if spec.rcode not in RCODES:
        raise LabError(f"--rcode must be one of {', '.join(RCODES)}")
    if spec.error_style not in ("echo", "header-only"):
        raise LabError("--error-style must be echo or header-only")
    dns_fault_args = parse_fault(spec.fault)
    argv, ready_marker = _workload_argv(spec)
    state_dir = STATE_ROOT / spec.name
    if state_dir.exists():
        raise LabError(f"a lab named {spec.name!r} is already up (gdbdiag lab down --name {spec.name})")

    if spec.rootfs:
        root = rootfs_mod.ensure_user_rootfs(spec.rootfs, spec.cache)
        release = None
    else:
        root = rootfs_mod.ensure_release(spec.release, spec.cache, log=log)
        release = spec.release

    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    try:
        state_dir.mkdir()
    except FileExistsError:
        raise LabError(f"a lab named {spec.name!r} is already up") from None
    h = hashlib.sha1(spec.name.encode()).hexdigest()[:8]
    lab = Lab(name=spec.name, state_dir=str(state_dir), release=release, rootfs=str(root),
              workload="custom" if spec.cmd else spec.workload, fault=spec.fault,
              rcode=spec.rcode)
    lab.save()
    try:
        _bring_up(spec, lab, root, h, argv, ready_marker, dns_fault_args, log)
    except BaseException:
        down(spec.name, quiet=True)
        raise
    return lab


def _bring_up(spec, lab, root, h, argv, ready_marker, dns_fault_args, log):
    _network(spec, lab, h)
    _start_dns(spec, lab, dns_fault_args)
    _container_files(spec, lab)
    _overlay_root(lab, root)
    _start_container(spec, lab, argv, ready_marker)
    log(f"lab {lab.name} up: {lab.workload} pid {lab.pid} on {release_label(lab)}")


def _network(spec, lab, h):
    """Two network namespaces (pod, DNS) and a veth pair between them; each step is
    saved at once, so ``down`` removes what exists."""
    lab.netns_pod, lab.netns_dns = f"gdbdiag-{spec.name}-pod", f"gdbdiag-{spec.name}-dns"
    lab.veth_pod, lab.veth_dns = f"gdv{h}p", f"gdv{h}d"
    for ns in (lab.netns_pod, lab.netns_dns):
        if Path(f"/run/netns/{ns}").exists():
            raise LabError(f"network namespace {ns} already exists (a lab left behind? "
                           f"`ip netns del {ns}`)")
    run(["ip", "netns", "add", lab.netns_pod])
    lab.save()
    run(["ip", "netns", "add", lab.netns_dns])
    lab.save()
    run(["ip", "link", "add", lab.veth_pod, "netns", lab.netns_pod, "type", "veth",
         "peer", "name", lab.veth_dns, "netns", lab.netns_dns])
    lab.save()
    for ns, dev, me, peer in ((lab.netns_pod, lab.veth_pod, POD_ADDR, DNS_ADDR),
                              (lab.netns_dns, lab.veth_dns, DNS_ADDR, POD_ADDR)):
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "addr", "add", me, "peer", peer, "dev", dev])
        run(["ip", "-n", ns, "link", "set", dev, "up"])


def _start_dns(spec, lab, dns_fault_args):
    """The DNS server (gdbdiag.lab.dns) in the DNS namespace; returns once it is ready."""
    sd = Path(lab.state_dir)
    lab.dns_log = str(sd / "dns.log")
    ready = sd / "dns.ready"
    dns_argv = [sys.executable, "-m", "gdbdiag.lab.dns", "--listen", DNS_ADDR, "--port", "53",
                "--log", lab.dns_log, "--ready-file", str(ready), "--rcode", spec.rcode,
                "--error-style", spec.error_style, *dns_fault_args]
    if spec.fault_match:
        dns_argv += ["--match", spec.fault_match]
    for rec in spec.records:
        dns_argv += ["--record", rec]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with open(sd / "dns.stderr", "w") as err:
        p = subprocess.Popen(["ip", "netns", "exec", lab.netns_dns, *dns_argv],
                             stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                             start_new_session=True)
    lab.dns_pid, lab.dns_start = p.pid, start_time(p.pid)
    lab.save()
    wait_until(lambda: ready.exists(), 10, lambda: p.poll() is not None,
               f"DNS server did not start: {tail(sd / 'dns.stderr')}")


def _container_files(spec, lab):
    """resolv.conf (the incident's search list and ndots), hosts, hostname, out dir."""
    sd = Path(lab.state_dir)
    opts = "ndots:5" + (f" {spec.resolv_options}" if spec.resolv_options else "")
    (sd / "resolv.conf").write_text(f"search {SEARCH}\nnameserver {DNS_ADDR}\noptions {opts}\n")
    (sd / "hosts").write_text(f"127.0.0.1\tlocalhost\n{POD_ADDR}\t{spec.hostname}."
                              f"keydb.default.svc.cluster.local {spec.hostname}\n")
    (sd / "hostname").write_text(spec.hostname + "\n")
    lab.out_dir = str(sd / "out")
    os.makedirs(lab.out_dir)
    lab.workload_log = str(sd / "workload.log")


def _overlay_root(lab, root):
    """The container's root: an overlay over the cached rootfs, so the cache never changes."""
    sd = Path(lab.state_dir)
    for d in ("upper", "work", "merged"):
        (sd / d).mkdir()
    lab.merged = str(sd / "merged")
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={root},upperdir={sd / 'upper'},workdir={sd / 'work'}", lab.merged])
    lab.save()


def _start_container(spec, lab, argv, ready_marker):
    """The runc container (bundle generated here); returns once the workload is ready."""
    sd = Path(lab.state_dir)
    bundle = sd / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(oci_config(spec, lab, argv), indent=1))
    lab.runc_id = f"gdbdiag-{spec.name}"
    lab.save()
    RUNC_ROOT.mkdir(parents=True, exist_ok=True)
    pidfile = sd / "container.pid"
    with open(lab.workload_log, "w") as out:
        r = subprocess.run(["runc", "--root", str(RUNC_ROOT), "run", "--detach",
                            "--bundle", str(bundle), "--pid-file", str(pidfile), lab.runc_id],
                           stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                           start_new_session=True, timeout=60)
    if r.returncode != 0:
        raise LabError(f"runc could not start the container: {tail(Path(lab.workload_log))}")
    lab.pid = int(pidfile.read_text().strip())
    lab.save()
    if ready_marker:
        wait_until(lambda: ready_marker in tail(Path(lab.workload_log), 20000), 30,
                   lambda: not pid_alive(lab.pid),
                   f"workload did not start: {tail(Path(lab.workload_log))}")
    else:
        time.sleep(0.3)
        if not pid_alive(lab.pid):
            raise LabError(f"the command exited at once: {tail(Path(lab.workload_log))}")


def release_label(lab: Lab) -> str:
    return lab.release or f"image {lab.rootfs}"


def down(name: str, quiet: bool = False) -> list[str]:
    """Remove everything lab ``name`` created. Returns the problems met (empty when clean)."""
    state_dir = STATE_ROOT / name
    if not state_dir.exists():
        if quiet:
            return []
        raise LabError(f"no lab named {name!r}")
    try:
        lab = Lab.load(name)
    except (LabError, ValueError, TypeError):
        lab = Lab(name=name, state_dir=str(state_dir))
    problems: list[str] = []
    # container: kill and delete through runc (it knows the cgroup and the init PID)
    if lab.runc_id:
        rr = ["runc", "--root", str(RUNC_ROOT)]
        subprocess.run(rr + ["kill", lab.runc_id, "KILL"], capture_output=True)
        if lab.pid:
            deadline = time.monotonic() + 10
            while pid_alive(lab.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        r = subprocess.run(rr + ["delete", "--force", lab.runc_id], capture_output=True, text=True)
        if r.returncode != 0 and "does not exist" not in r.stderr:
            problems.append(f"runc delete: {r.stderr.strip()}")
    if lab.pid and pid_alive(lab.pid):
        problems.append(f"workload pid {lab.pid} still alive")
    # DNS server: only the process we started (PID and start time must match)
    if lab.dns_pid and pid_matches(lab.dns_pid, lab.dns_start):
        try:
            os.killpg(lab.dns_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while pid_alive(lab.dns_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(lab.dns_pid):
            os.killpg(lab.dns_pid, signal.SIGKILL)
    if lab.merged and os.path.ismount(lab.merged):
        r = subprocess.run(["umount", lab.merged], capture_output=True, text=True)
        if r.returncode != 0:
            r = subprocess.run(["umount", "-l", lab.merged], capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"umount {lab.merged}: {r.stderr.strip()}")
    for ns in (lab.netns_pod, lab.netns_dns):
        if ns and Path(f"/run/netns/{ns}").exists():
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"ip netns del {ns}: {r.stderr.strip()}")
    if not problems:
        shutil.rmtree(state_dir, ignore_errors=True)
    return problems


def leftovers(name: str) -> list[str]:
    """What of lab ``name`` can still be seen on the host (used by tests and `lab down`)."""
    found = []
    if (STATE_ROOT / name).exists():
        found.append(f"state dir {STATE_ROOT / name}")
    for ns in (f"gdbdiag-{name}-pod", f"gdbdiag-{name}-dns"):
        if Path(f"/run/netns/{ns}").exists():
            found.append(f"netns {ns}")
    h = hashlib.sha1(name.encode()).hexdigest()[:8]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for v in (f"gdv{h}p", f"gdv{h}d"):
        if re.search(rf"\b{v}\b", links):
            found.append(f"veth {v}")
    with open("/proc/self/mounts") as fh:
        for line in fh:
            if f"/{name}/merged" in line.split()[1] and str(STATE_ROOT) in line:
                found.append(f"mount {line.split()[1]}")
    r = subprocess.run(["runc", "--root", str(RUNC_ROOT), "state", f"gdbdiag-{name}"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        found.append(f"runc container gdbdiag-{name}")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gdbdiag.lab.dns" in cmd and str(STATE_ROOT / name).encode() + b"/dns.log" in cmd:
            found.append(f"dns server pid {pid}")
    return found
