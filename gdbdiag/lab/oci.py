"""The OCI runtime configuration (runc's config.json) of a lab container: its own
mount, PID, UTS and IPC namespaces, the pod's network namespace joined by path (like a
Kubernetes pod), the lab's resolv.conf/hosts/hostname and the payload bind-mounted."""
from __future__ import annotations

from pathlib import Path

PAYLOAD = Path(__file__).resolve().parent / "payload"


def _host_nofile() -> tuple[int, int]:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = hard if hard != resource.RLIM_INFINITY else 1 << 20
    soft = min(soft if soft != resource.RLIM_INFINITY else hard, hard)
    return soft, hard


def oci_config(spec, lab, argv: list[str]) -> dict:
    """config.json for ``lab`` (a :class:`~.container.Lab`) running ``argv`` as its init."""
    soft, hard = _host_nofile()
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
            "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
    sd = Path(lab.state_dir)
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": str(sd / "resolv.conf"),
         "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(sd / "hosts"),
         "options": ["rbind", "ro"]},
        {"destination": "/etc/hostname", "type": "bind", "source": str(sd / "hostname"),
         "options": ["rbind", "ro"]},
        {"destination": "/opt/gdbdiag", "type": "bind", "source": str(PAYLOAD),
         "options": ["rbind", "ro"]},
        {"destination": "/gdbdiag-out", "type": "bind", "source": lab.out_dir,
         "options": ["rbind", "rw"]},
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": argv,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME=/root", "LANG=C.UTF-8", f"HOSTNAME={spec.hostname}"],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": soft}],
            "noNewPrivileges": True,
        },
        "root": {"path": lab.merged, "readonly": False},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network", "path": f"/run/netns/{lab.netns_pod}"}],
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
