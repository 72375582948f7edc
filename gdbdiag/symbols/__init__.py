"""Host side: identify a target's glibc, fetch/verify/cache its debug files, tell gdb
which files to load, and say whether the build has glibc bug 30081.

Modules: ``rootfs`` (SafeRoot: paths inside a foreign root), ``elfinfo`` (build-id,
banner), ``identify`` (process / file / rootfs → TargetIdent), ``net`` (HTTP with
timeouts and a progress bar), ``extract`` (.deb/.ddeb via dpkg-deb or pure Python),
``cache`` (SymbolCache, by build-id), ``sources`` (debian / ubuntu / debuginfod / local,
``fetch_symbols``), ``gdbload`` (gdb setup commands, loaded-build-id check),
``analyze`` + ``debdata`` + ``refresh`` (debian-symbols data, ``check``), ``cli``
(``symbols`` and ``check`` sub-commands), ``testing`` (test fixtures).
"""
from .cache import SymbolCache
from .gdbload import check_loaded, gdb_setup_commands
from .identify import IdentifyError, ObjectIdent, TargetIdent, identify_file, identify_process, identify_root
from .sources import FetchResult, Settings, fetch_symbols

__all__ = ["SymbolCache", "check_loaded", "gdb_setup_commands", "IdentifyError", "ObjectIdent", "TargetIdent",
           "identify_file", "identify_process", "identify_root", "FetchResult", "Settings", "fetch_symbols"]
