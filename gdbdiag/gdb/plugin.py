"""Register gdbdiag inside gdb: the `resolv` commands, settings, printers, functions."""
import gdb

_registered = []


def register():
    if _registered:          # sourced twice: gdb keeps the first registration
        return
    from . import commands, printers
    for cls in commands.COMMANDS:
        _registered.append(cls())
    _registered.extend(commands.register_parameters())
    printers.register()
    gdb.write("gdbdiag loaded: `help resolv` (status, trace, untrace, report, probes, symbols)\n")
