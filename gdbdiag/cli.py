"""Command-line entry point (host side)."""
import sys


def main(argv=None):
    print("gdbdiag: not yet wired", file=sys.stderr)
    return 2
