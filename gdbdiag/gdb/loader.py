# gdbdiag — load the plugin into gdb's embedded Python.
#
#   (gdb) source /path/to/gdbdiag/gdb/loader.py      or      gdb -x /path/to/loader.py
#
# `gdbdiag gdbinit` prints the exact line. gdb embeds Debian's /usr/bin/python3, not the
# venv: this file puts the package and, when its Python version matches, the venv's
# site-packages on sys.path. The plugin needs the venv's capstone, pyelftools and dnslib
# (the analyzer, memory reading, DNS decoding), python-debian/zstandard/unidiff for
# `resolv symbols` and glibc's source; without pygments/tabulate the output is plain text.
import glob
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(os.path.dirname(_here))        # the directory holding gdbdiag/
if _root not in sys.path:
    sys.path.insert(0, _root)
_venv = os.environ.get("GDBDIAG_VENV") or os.path.join(_root, ".venv")
_sp = os.path.join(_venv, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")
if os.path.isdir(_sp):
    if _sp not in sys.path:
        sys.path.append(_sp)
elif glob.glob(os.path.join(_venv, "lib", "python*", "site-packages")):
    print("gdbdiag: %s was built for another Python than gdb's %d.%d; using gdb's own "
          "modules only" % (_venv, sys.version_info[0], sys.version_info[1]))

import gdbdiag.gdb.plugin as _plugin  # noqa: E402

_plugin.register()
