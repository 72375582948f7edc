"""Shared by tests/test_debug_image.py and tests/test_pod.py: the debug image
(deploy/Containerfile, built by scripts/build-image) and the podman containers run from
it, each removed when its test ends, pass or fail.

Podman on these machines runs only as ``podman --runtime runc --cgroup-manager=cgroupfs``
(crun fails on the hybrid cgroup hierarchy) and with explicit ulimits (its defaults exceed
the host's hard limits). When podman or the image build is missing, the tests FAIL with
the reason: this machine is expected to have both (scripts/setup installs podman).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
CAP_SYS_PTRACE, CAP_SYS_ADMIN = 19, 21


def require_podman() -> None:
    if not shutil.which("podman"):
        pytest.fail("podman is not installed: scripts/setup installs it (the debug-image "
                    "tests need it)", pytrace=False)
    r = subprocess.run(PODMAN + ["info", "--format", "{{.Host.OCIRuntime.Name}}"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"podman does not work here: {r.stderr.strip()[-400:]}", pytrace=False)


def build_image() -> dict:
    """scripts/build-image (builds, or finds the image up to date); its tag and output."""
    require_podman()
    t0 = time.monotonic()
    r = subprocess.run([str(REPO / "scripts" / "build-image")], capture_output=True, text=True,
                       timeout=1200, env=dict(os.environ, GDBDIAG_ENGINE="podman"))
    if r.returncode != 0:
        pytest.fail("scripts/build-image failed:\n" + (r.stderr + r.stdout)[-3000:], pytrace=False)
    tag = subprocess.run([str(REPO / "scripts" / "build-image"), "--print-tag"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return {"tag": tag, "stderr": r.stderr, "seconds": time.monotonic() - t0}


@pytest.fixture(scope="session")
def debug_image() -> dict:
    return build_image()


def caps_of(status_text: str) -> dict:
    """CapEff/CapPrm/CapBnd/CapInh/CapAmb of a /proc/PID/status text, as integers."""
    out = {}
    for line in status_text.splitlines():
        if line.startswith("Cap") and ":" in line:
            k, v = line.split(":", 1)
            out[k] = int(v.strip(), 16)
    return out


class Containers:
    """`podman run --rm --name NAME …` of the debug image; every container it started is
    removed at teardown (by its name), whatever the test did."""

    def __init__(self, image: str):
        self.image, self.names = image, []

    def name(self) -> str:
        n = f"gdbdiag-test-{os.getpid()}-{len(self.names)}-{int(time.time() * 1000) % 100000}"
        self.names.append(n)
        return n

    def argv(self, *, pid: str, caps: tuple[str, ...] | None, out: Path | None, command: list[str],
             name: str | None = None) -> list[str]:
        """The debug container: PID namespace ``pid`` (ns:PATH or host), no network,
        exactly ``caps`` (all others dropped; None: podman's defaults), and at most one
        host directory, mounted at /out."""
        a = PODMAN + ["run", "--rm", "--name", name or self.name(), "--pid", pid,
                      "--network", "none", *ULIMITS]
        if caps is not None:
            a += ["--cap-drop", "ALL"] + (["--cap-add", ",".join(caps)] if caps else [])
        if out is not None:
            a += ["-v", f"{out}:/out"]
        return a + [self.image, *command]

    def run(self, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        argv = self.argv(**kw)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"debug container did not finish in {timeout} s: "
                                 f"{(exc.stdout or b'')[-2000:]!r}") from None

    def cleanup(self) -> list[str]:
        left = []
        for n in self.names:
            subprocess.run(PODMAN + ["rm", "--force", "--time", "0", n], capture_output=True)
            r = subprocess.run(PODMAN + ["container", "exists", n], capture_output=True)
            if r.returncode == 0:
                left.append(n)
        return left


@pytest.fixture
def containers(debug_image):
    c = Containers(debug_image["tag"])
    yield c
    left = c.cleanup()
    if left:
        pytest.fail(f"debug containers left behind: {left}", pytrace=False)


def wait_sticky(lab, timeout: float = 20.0) -> None:
    """Until the lab's DNS server has dropped the AAAA answer (fault drop-aaaa-once):
    from then on the Redis thread is sticky, or goes sticky when its poll times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("action") == "dropped" for r in lab.dns_records()):
            return
        time.sleep(0.2)
    raise AssertionError("the lab's DNS server dropped no AAAA answer: "
                         + repr(lab.dns_records()[-5:]))
