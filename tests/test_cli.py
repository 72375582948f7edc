"""gdbdiag.cli.main: the one place where an error becomes an exit status and one line."""
import pytest

from gdbdiag import cli
from gdbdiag.errors import EXIT_TOOL, EXIT_USAGE, GdbdiagError
from gdbdiag.lab.errors import LabError
from gdbdiag.symbols.identify import IdentifyError


@pytest.mark.parametrize("exc,code,line", [
    (LabError("lab x: DNS server is not running"), EXIT_TOOL, "gdbdiag gdbinit: lab x: DNS server is not running"),
    (IdentifyError("no libc.so.6\nfound"), EXIT_USAGE, "gdbdiag gdbinit: no libc.so.6 found"),
    (GdbdiagError("refused", 3), 3, "gdbdiag gdbinit: refused"),
    (ValueError("bad value"), EXIT_TOOL,
     "gdbdiag gdbinit: internal error: ValueError: bad value (GDBDIAG_TRACEBACK=1 shows the traceback)"),
])
def test_errors_become_one_line(monkeypatch, capsys, exc, code, line):
    def fail(args):
        raise exc
    monkeypatch.setattr(cli, "_gdbinit", fail)
    monkeypatch.delenv("GDBDIAG_TRACEBACK", raising=False)
    assert cli.main(["gdbinit"]) == code
    err = capsys.readouterr().err
    assert err.splitlines() == [line]
    # the switches: the whole traceback, the same exit status
    for argv, env in ((["--traceback", "gdbinit"], None), (["gdbinit"], "1")):
        if env:
            monkeypatch.setenv("GDBDIAG_TRACEBACK", env)
        assert cli.main(argv) == code
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "in fail" in err
        assert err.rstrip().splitlines()[-1].endswith(str(exc).splitlines()[-1])


# exception classes in modules being changed elsewhere at the time of writing; each
# should derive from GdbdiagError too (then leaves this set)
PENDING: set[str] = set()


def test_every_package_exception_has_the_base():
    """Each exception class gdbdiag defines (outside gdb) derives from GdbdiagError."""
    import importlib
    import pkgutil

    import gdbdiag

    missing = []
    for m in pkgutil.walk_packages(gdbdiag.__path__, "gdbdiag."):
        if m.name.startswith("gdbdiag.gdb") or m.name.endswith("__main__"):
            continue                     # inside gdb only (imports gdb); a program
        mod = importlib.import_module(m.name)
        for name, obj in vars(mod).items():
            if (isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == m.name
                    and not issubclass(obj, GdbdiagError)):
                missing.append(f"{m.name}.{name}")
    assert sorted(set(missing) - PENDING) == []
