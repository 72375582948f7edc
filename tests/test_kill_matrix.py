"""The kill matrix: every process gdbdiag starts is SIGKILLed at random moments while the
target's threads resolve back to back — the target must never notice.

Target: a bullseye lab container whose 8 threads call getaddrinfo back to back (healthy
DNS: every name answers), (a) all threads healthy, (b) one thread sticky, so send_dg's
probes fire on it all the time. For each batch mode (armed, lean, full) the runner — which
is also the owner of the probes (their perf event descriptors) — is killed at a random
moment of the run, arming included.
After each kill: the target is alive and not stopped, its lookups go on, no code byte
differs from the files, nothing traces it and no probe owner is left.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from gdbdiag.codecheck import diff_code
from conftest import tracer_of
from test_attach import Runner

pytestmark = pytest.mark.lab

NAMES = tuple(f"keydb-{i}.keydb" for i in range(8))
RECORDS = tuple(f"{n}=A:10.244.1.{10 + i}" for i, n in enumerate(NAMES)) + \
    tuple(f"{n}=AAAA:fd00::{10 + i}" for i, n in enumerate(NAMES))
KILLS_PER_CASE = 4
SEED = int(os.environ.get("GDBDIAG_KILL_SEED", time.time()))


def _lookups(lab) -> int:
    p = Path(lab.out_dir) / "lookups.jsonl"
    return sum(1 for _ in open(p)) if p.exists() else 0


def _state(pid: int) -> str:
    st = Path(f"/proc/{pid}/stat").read_text()
    return st.rsplit(")", 1)[1].split()[0]


def _sticky_threads(pid: int) -> list[int]:
    from gdbdiag.passive import PassiveSampler
    with PassiveSampler(pid) as smp:
        return [s.tid for s in smp.sample() if s.sticky]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _state(pid) == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def assert_unharmed(lab, owners: list[int]):
    for o in owners:
        assert _gone(o, 10), f"probe owner {o} outlived its run"
    assert lab.alive(), "the target died"
    assert _state(lab.pid) not in ("T", "t", "Z"), "the target is stopped"
    assert tracer_of(lab.pid) == 0
    assert diff_code(lab.pid, ("libc", "libresolv", "libnss_dns")) == [], "code bytes changed"
    n = _lookups(lab)
    deadline = time.monotonic() + 10
    while _lookups(lab) <= n + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _lookups(lab) > n + 8, "the target's lookups stopped"


@pytest.fixture(scope="module")
def labs():
    from gdbdiag.lab.container import LabSpec, down, leftovers, up
    made = {}
    try:
        made["healthy"] = up(LabSpec(name=f"km-h{os.getpid() % 10000}", release="bullseye",
                                     workload="resolver", names=NAMES, interval=0.0,
                                     fault="none", records=RECORDS))
        made["sticky"] = up(LabSpec(name=f"km-s{os.getpid() % 10000}", release="bullseye",
                                    workload="resolver", names=NAMES, interval=0.0,
                                    fault="drop-aaaa-once", fault_match="keydb-3.keydb*",
                                    records=RECORDS))
        deadline = time.monotonic() + 30
        while not _sticky_threads(made["sticky"].pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(_sticky_threads(made["sticky"].pid)) == 1, "no thread went sticky"
        yield made
    finally:
        problems = []
        for lab in made.values():
            problems += down(lab.name, quiet=True) + leftovers(lab.name)
        assert not problems, problems


@pytest.mark.parametrize("state", ["healthy", "sticky"])
@pytest.mark.parametrize("mode", ["armed", "lean", "full"])
def test_sigkill_of_the_runner_at_a_random_moment(labs, state, mode):
    lab = labs[state]
    rnd = random.Random(f"{SEED}-{state}-{mode}")
    for _ in range(KILLS_PER_CASE):
        extra = [] if mode == "armed" else [f"--{mode}"]
        r = Runner(lab.pid, "--duration", "60", *extra)
        try:
            time.sleep(rnd.uniform(0.0, 3.0))       # arming takes ~0.3-1 s: both phases hit
            os.kill(r.p.pid, signal.SIGKILL)
            r.finish(30)
        finally:
            if r.p.poll() is None:
                r.p.kill()
        assert_unharmed(lab, [])


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP", "duration"])
def test_every_clean_ending_under_load(labs, how, tmp_path):
    lab = labs["sticky"]
    r = Runner(lab.pid, "--duration", "4" if how == "duration" else "60", "--full",
               "--json", tmp_path / "rep.json")
    try:
        r.wait_for("armed in", 30)
        owners = _children(r.p.pid)
        if how == "duration":
            pass
        else:
            time.sleep(random.uniform(0.2, 2.0))
            os.kill(r.p.pid, getattr(signal, how))
        rc = r.finish(60)
    finally:
        if r.p.poll() is None:
            r.p.kill()
    assert rc == 0, r.text
    assert "== verdict:" in r.text
    assert_unharmed(lab, owners)
