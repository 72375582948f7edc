"""pytest plugin (entry point ``pytest11: gdbdiag_lab``): the replay lab as fixtures.

Write your own replay tests the way gdbdiag's do::

    def test_my_service_survives_a_lost_aaaa(lab_factory):
        lab = lab_factory(rootfs="my-image.tar", cmd="/usr/local/bin/keydb-server ...",
                          fault="drop-aaaa-once")
        ...

Every lab a test starts is torn down when the test ends, passed or failed (and, as a
backstop, when the interpreter exits). ``--lab-keep`` leaves failed tests' labs up for a
look (``gdbdiag lab list`` / ``gdbdiag lab down --name NAME``).
"""
from __future__ import annotations

import atexit
import itertools
import os

import pytest

from .container import Lab, LabSpec, down, leftovers, up

_counter = itertools.count(1)
_live: set[str] = set()


def _cleanup_all() -> None:
    for name in list(_live):
        down(name, quiet=True)
        _live.discard(name)


atexit.register(_cleanup_all)


def pytest_addoption(parser):
    group = parser.getgroup("gdbdiag-lab")
    group.addoption("--lab-keep", action="store_true",
                    help="keep the labs of failed tests up (remove with `gdbdiag lab down`)")
    group.addoption("--lab-cache", default=None,
                    help="root filesystem cache for lab containers (default /var/cache/gdbdiag)")


def pytest_configure(config):
    config.addinivalue_line("markers", "lab: the test starts lab containers (needs root)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"_gdbdiag_rep_{rep.when}", rep)


@pytest.fixture
def lab_factory(request):
    """Start labs: ``lab_factory(name=None, **LabSpec fields) -> Lab``; all removed after."""
    if os.geteuid() != 0:
        pytest.fail("lab containers need root (network namespaces, mounts, runc)", pytrace=False)
    started: list[str] = []
    cache = request.config.getoption("--lab-cache")

    def start(name: str | None = None, **fields) -> Lab:
        name = name or f"t{os.getpid() % 100000}-{next(_counter)}"
        fields.setdefault("cache", cache)
        spec = LabSpec(name=name, **fields)
        started.append(name)
        _live.add(name)
        return up(spec)

    yield start

    failed = getattr(request.node, "_gdbdiag_rep_call", None)
    keep = request.config.getoption("--lab-keep") and failed is not None and failed.failed
    problems = []
    for name in reversed(started):
        if keep:
            continue
        problems += down(name, quiet=True)
        problems += leftovers(name)
        _live.discard(name)
    if problems:
        pytest.fail("lab teardown left things behind: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def lab(lab_factory):
    """One default lab: bullseye, redis replica of keydb-0.keydb, one AAAA answer lost."""
    return lab_factory()
