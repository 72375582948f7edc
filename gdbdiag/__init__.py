"""gdbdiag: diagnose glibc's sticky single-request resolver stall live, with gdb."""

__version__ = "0.1.0"
