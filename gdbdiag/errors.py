"""Exit codes and the one-line error every sub-command reports."""

EXIT_OK = 0          # the run completed (whatever the verdict, unless --fail-on applies)
EXIT_FAIL_ON = 1     # --fail-on matched the verdict
EXIT_USAGE = 2       # bad command line (argparse uses 2 as well)
EXIT_REFUSED = 3     # the target was refused (missing, zombie, traced, no permission, no glibc resolver)
EXIT_TOOL = 4        # gdbdiag itself failed (lab, symbols, gdb)


class GdbdiagError(Exception):
    """A failure reported as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_TOOL):
        super().__init__(message)
        self.code = code
