"""Host-side stack unwinding of a live thread from captured registers: no ptrace stop.

A kernel-uprobe capture gives a thread's ``rip rsp rbp rbx r12-r15`` at a probe (e.g. the
call to ``__poll`` in send_dg); while the thread then sits blocked in the syscall its stack
cannot change, so :func:`unwind` reads it through ``/proc/PID/mem`` and walks it with the
``.eh_frame`` CFI of each object (Debian builds have no frame pointers).  The walk is here;
:mod:`.objects` reads the mappings and each object's PT_LOADs, CFI and symbols (opened as
the target sees them, cached by build-id); :mod:`.cfa` takes one step up, by the CFI
(DWARF-expression rules included) or, for a PC without CFI, by the frame pointer.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from elftools.common.exceptions import DWARFError, ELFError

from ..errors import GdbdiagError
from ..passive import PassiveError, ProcMem
from .cfa import M64, OUTERMOST, RA, REGS, RSP, _cfi_step, _fp_step
from .objects import _find_map, _Map, _Obj, _open_obj, _read_maps, clear_cache

__all__ = ["Frame", "UnwindError", "unwind", "REGS", "clear_cache"]


class UnwindError(GdbdiagError):
    """The process cannot be unwound at all (gone, no permission): one-line reason."""


@dataclass
class Frame:
    pc: int
    module: str | None            # basename of the object as the target sees it
    module_offset: int | None     # pc - load bias (the object's own virtual address)
    symbol: str | None
    symbol_offset: int | None
    how: str                      # "first" (the registers), "cfi", "fp" (frame pointer)
    provenance: str = "memory"
    sp: int | None = None         # rsp in this frame, when known
    stop_reason: str | None = None  # set on the last frame when the unwind stopped early

    def label(self) -> str:
        """What gdb's ``bt`` shows as the function: the symbol, else the address."""
        return self.symbol if self.symbol else f"0x{self.pc:016x}"

    def __str__(self) -> str:
        where = f"{self.symbol}+{self.symbol_offset:#x}" if self.symbol else "??"
        mod = f" ({self.module}+{self.module_offset:#x})" if self.module else ""
        return f"0x{self.pc:016x} {where}{mod} [{self.how}]"


# --- the walk ---
def _obj_of(pid: int, m: _Map, mem, seen: dict) -> tuple[_Obj | None, str | None]:
    """(object data, error) of mapping ``m``, memoised per unwind in ``seen``."""
    if m.start not in seen:
        try:
            seen[m.start] = (_open_obj(pid, m, mem), None)
        except (OSError, ELFError, DWARFError, ValueError, struct.error) as e:
            seen[m.start] = (None, f"cannot read {m.path or 'mapping'}: {e}")
    return seen[m.start]


def _frame(pc: int, m: _Map | None, obj: _Obj | None, how: str, regs: dict, debug_dirs):
    f = Frame(pc=pc, module=m.name if m else None, module_offset=None, symbol=None,
              symbol_offset=None, how=how, sp=regs.get(RSP))
    v = obj.vaddr(m, pc) if obj is not None else None
    if v is not None:
        f.module_offset = v
        with obj.lock:
            hit = obj.symbolize(v, debug_dirs)
        if hit:
            f.symbol, f.symbol_offset = hit
    return f, v


_PARSE_ERRORS = (ELFError, DWARFError, AssertionError, KeyError, ValueError, IndexError,
                 struct.error)


def _step(obj: _Obj | None, lookup: int | None, regs: dict, mem, after_fp: bool, err: str | None):
    """One frame up: (caller regs | None, stop reason | None, how, exact-pc for the caller)."""
    fde = None
    if obj is not None and lookup is not None:
        try:
            with obj.lock:
                fde = obj.cfi.find(lookup)
                if fde is not None:
                    new, reason = _cfi_step(fde, lookup, regs, mem)
                    signal = "S" in fde.cie["augmentation"].decode("ascii", "replace")
                    return new, reason, "cfi", signal       # caller of a signal frame: exact pc
        except _PARSE_ERRORS as e:                         # foreign CFI that pyelftools rejects
            return None, f"unusable CFI at {lookup:#x}: {type(e).__name__}: {e}", "cfi", False
    if after_fp:
        return None, "no CFI for this pc (after a frame-pointer step)", "fp", False
    new, reason = _fp_step(regs, mem)
    if reason and reason != OUTERMOST and err:
        reason = err
    return new, reason, "fp", False


def _walk(pid: int, maps, regs: dict, max_frames: int, debug_dirs, mem) -> list[Frame]:
    frames: list[Frame] = []
    seen, starts = {}, [m.start for m in maps]
    how, exact, after_fp = "first", True, False
    while True:
        pc = regs[RA]
        m = _find_map(maps, starts, pc)
        obj, err = _obj_of(pid, m, mem, seen) if m is not None and "x" in m.perms else (None, None)
        f, v = _frame(pc, m, obj, how, regs, debug_dirs)
        frames.append(f)
        if m is None or "x" not in m.perms:
            f.stop_reason = f"pc {pc:#x} is not in an executable mapping"
            break
        if len(frames) >= max(1, max_frames):
            f.stop_reason = f"max_frames ({max_frames}) reached"
            break
        lookup = v if (exact or v is None) else v - 1
        new, reason, how, exact = _step(obj, lookup, regs, mem, after_fp, err)
        after_fp = how == "fp"
        if reason == OUTERMOST:
            break
        if new is None:
            f.stop_reason = reason
            break
        if not exact and regs.get(RSP) is not None and new[RSP] <= regs[RSP]:
            f.stop_reason = "the caller's stack pointer is not above this frame's (corrupt stack?)"
            break
        regs = new
    return frames


def unwind(pid: int, regs: dict[str, int], max_frames: int = 64, debug_dirs=(),
           mem=None) -> list[Frame]:
    """Unwind thread state ``regs`` (names as in :data:`REGS`: rip, rsp, rbp, rbx, r12-r15;
    missing ones are unknown) of process ``pid``, reading its stack through ``mem``
    (``read(addr, n) -> bytes | None``; default /proc/PID/mem).  Frames innermost first;
    the last one carries ``stop_reason`` if the walk stopped before the outermost frame."""
    r = {REGS[k]: v & M64 for k, v in regs.items() if k in REGS and v is not None}
    if RA not in r:
        raise ValueError("regs must include rip")
    try:
        maps = _read_maps(pid)                       # sorted by address, as the kernel lists them
    except FileNotFoundError:
        raise UnwindError(f"no such process: {pid}") from None
    except PermissionError as e:
        raise UnwindError(f"cannot read /proc/{pid}/maps ({e.strerror})") from None
    own = mem is None
    if own:
        try:
            mem = ProcMem(pid)
        except PassiveError as e:
            raise UnwindError(str(e)) from None
    try:
        return _walk(pid, maps, r, max_frames, tuple(debug_dirs), mem)
    finally:
        if own:
            mem.close()
