"""Host side: identify a target's glibc, fetch/verify/cache its debug files and its
glibc source, tell gdb which files to load, and say whether the build has glibc bug 30081.

The target: ``rootfs`` (SafeRoot: paths inside a foreign root), ``rootinfo``
(os-release, dpkg, ld.so.cache), ``elfinfo`` (build-id, banner), ``identify`` (process
/ file / rootfs → TargetIdent).  Archive access: ``net`` (HTTP with timeouts and a
progress bar), ``archive`` (Debian's signed archive: InRelease → Packages/Sources →
files), ``extract`` (.deb/.ddeb via dpkg-deb or python-debian).  Debug symbols:
``cache`` (SymbolCache, by build-id), ``sources`` (debian / ubuntu / debuginfod / local,
``fetch_symbols``), ``gdbload`` (gdb setup commands, loaded-build-id check).  glibc
source: ``glibcsrc`` (download, Debian's patches with GNU patch, the cached tree).
``analyze`` + ``debdata`` + ``refresh`` (debian-symbols data, ``check``), ``cli``
(``symbols`` and ``check`` sub-commands).  Test fixtures live in tests/support/.
"""
from .cache import SymbolCache
from .gdbload import check_loaded, gdb_setup_commands
from .identify import IdentifyError, ObjectIdent, TargetIdent, identify_file, identify_process, identify_root
from .sources import FetchResult, Settings, fetch_symbols

__all__ = ["SymbolCache", "check_loaded", "gdb_setup_commands", "IdentifyError", "ObjectIdent", "TargetIdent",
           "identify_file", "identify_process", "identify_root", "FetchResult", "Settings", "fetch_symbols"]
