"""Debug symbols and glibc's source as enrichment of a kernel-probe run, never waited for.

The diagnosis needs neither: probe points and the bug-30081 verdict come from the code
(gdbdiag.glibc). With them, a run adds frame names of static functions, glibc source
lines at the switch and at the doomed poll, and a cross-check of the analyzer against
DWARF. ``--symbols auto`` takes what the cache has, fetches the rest in the background
within a budget, and says in one line which it did.
"""
from __future__ import annotations

import threading
import time


class Enrichment:
    def __init__(self, ident, mode: str = "auto", offline: bool = False, budget: float = 8.0,
                 source: bool = True):
        self.ident, self.mode, self.offline, self.budget = ident, mode, offline, budget
        self.want_source = source
        self.debug_files: dict[str, str] = {}        # build-id -> verified debug file
        self.origin: str | None = None
        self.source_tree = None
        self.notes: list[str] = []
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    # -- what is there now, and the background fetch -------------------------------------
    def start(self) -> str:
        """Take the cache; start fetching what is missing; the one-line account."""
        if self.mode == "off":
            return "symbols: off (disassembly only)"
        self._from_cache()
        missing = [o for o in self._objects() if o.build_id not in self.debug_files]
        if self.mode not in ("auto",):
            return f"symbols: {len(self.debug_files)} debug file(s) from {self.mode}"
        if not missing and (self.source_tree or not self.want_source):
            return f"symbols: from the cache ({self.origin or 'verified by build-id'})"
        if self.offline:
            return (f"symbols: {len(self.debug_files)} from the cache, {len(missing)} not cached "
                    "and --offline: disassembly only for those")
        self._thread = threading.Thread(target=self._fetch, daemon=True)
        self._thread.start()
        return (f"symbols: {len(self.debug_files)} from the cache; fetching the rest in the "
                f"background (at most {self.budget:.0f} s; the diagnosis does not wait)")

    def _objects(self):
        return [o for o in self.ident.objects if o.build_id and o.name.startswith(("libc.", "libresolv."))]

    def _from_cache(self):
        import os
        from ..symbols.cache import SymbolCache, default_cache_dir
        if self.mode not in ("auto",):
            for o in self._objects():
                b = o.build_id
                p = os.path.join(self.mode, ".build-id", b[:2], b[2:] + ".debug")
                if os.path.exists(p):
                    self.debug_files[b] = p
            return
        cache = SymbolCache(default_cache_dir())
        for o in self._objects():
            p = cache.lookup(o.build_id)
            if p:
                self.debug_files[o.build_id] = p
                self.origin = (cache.meta(o.build_id) or {}).get("origin") or self.origin
        if self.want_source and self.ident.package_version:
            from ..symbols import glibcsrc
            try:
                self.source_tree = glibcsrc.load_cached(self.ident.package_version)
            except Exception as exc:            # a damaged cache entry: no source lines
                self.notes.append(f"source: {exc}")

    def _fetch(self):
        from ..symbols.cache import SymbolCache, default_cache_dir
        from ..symbols.sources import Settings, fetch_symbols
        try:
            res = fetch_symbols(self.ident, Settings(offline=False, progress=False,
                                                     timeout=self.budget), SymbolCache(default_cache_dir()))
            for o in res.to_dict().get("objects", []):
                if o.get("debug_file") and o.get("build_id"):
                    self.debug_files[o["build_id"]] = o["debug_file"]
                    self.origin = o.get("origin") or self.origin
        except Exception as exc:
            self.notes.append(f"symbols: {getattr(exc, 'reason', None) or exc}")
        if self.want_source and self.source_tree is None and self.ident.package_version:
            try:
                from ..symbols import glibcsrc
                self.source_tree = glibcsrc.fetch_source(self.ident.package_version)
            except Exception as exc:
                self.notes.append(f"source: {getattr(exc, 'reason', None) or exc}")

    def settle(self, wait: float = 0.0) -> None:
        """At the end of a run: give the background fetch at most ``wait`` more seconds."""
        if self._thread is not None:
            self._thread.join(max(0.0, min(wait, self.budget - (time.monotonic() - self._t0))))

    @property
    def debug_dirs(self) -> list[str]:
        import os
        return sorted({os.path.dirname(os.path.dirname(os.path.dirname(p)))
                       for p in self.debug_files.values()})

    # -- source lines ----------------------------------------------------------------------
    def source_at(self, build_id: str, addr: int, context: int = 3) -> dict | None:
        """(file, line, text) at link-time address ``addr`` of the object ``build_id``,
        from its debug file's line table and Debian's source of this very build."""
        path = self.debug_files.get(build_id)
        if not path:
            return None
        loc = line_of(path, addr)
        if loc is None:
            return None
        fname, line = loc
        text = None
        if self.source_tree is not None:
            from ..symbols.glibcsrc import highlight
            lines = self.source_tree.lines(fname, line, context)
            text = highlight(lines, line, False) if lines else None
        return {"file": fname, "line": line, "text": text, "provenance": "dwarf"}


def line_of(debug_file: str, addr: int) -> tuple[str, int] | None:
    """DWARF's (file, line) for ``addr`` (through .debug_aranges to one CU's line table)."""
    from elftools.elf.elffile import ELFFile
    with open(debug_file, "rb") as fh:
        dw = ELFFile(fh).get_dwarf_info()
        ar = dw.get_aranges()
        off = ar.cu_offset_at_addr(addr) if ar else None
        if off is None:
            return None
        cu = dw.get_CU_at(off)
        lp = dw.line_program_for_CU(cu)
        best = None
        for e in lp.get_entries():
            st = e.state
            if st is None or st.end_sequence:
                continue
            if st.address <= addr and (best is None or st.address >= best.address):
                best = st
        if best is None:
            return None
        files = lp["file_entry"]
        idx = best.file - (0 if lp.header.version >= 5 else 1)
        if not 0 <= idx < len(files):
            return None
        name = files[idx].name.decode(errors="replace")
        d = files[idx].dir_index
        dirs = lp["include_directory"]
        di = d - (0 if lp.header.version >= 5 else 1)
        if d and 0 <= di < len(dirs):
            name = dirs[di].decode(errors="replace") + "/" + name
        return name, best.line
