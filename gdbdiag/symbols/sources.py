"""Where debug files come from, tried in a configurable order.

* ``debian``     — Debian's archive: ``libc6-dbg`` at the target's exact version, in
  whichever suite has it.  InRelease is checked with gpgv against the Debian archive
  keyrings, Packages by the SHA256 in InRelease, the .deb by the SHA256 in Packages.
* ``ubuntu``     — Ubuntu's pool layouts: archive ``libc6-dbg`` .deb, ddebs
  ``libc6-dbgsym`` .ddeb, Launchpad ``+files``; debug files matched by build-id (both
  the ``.build-id`` and the path-based layout).  No archive signature is checked here:
  the build-id match is the only guarantee, and the result says so.
* ``debuginfod`` — ``GET URL/buildid/ID/debuginfo`` for each URL of DEBUGINFOD_URLS.
* ``local``      — ``--local`` .deb/.ddeb files, directories, or debug files.

Whatever a source returns is verified against the target object's build-id before it
enters the cache (:meth:`SymbolCache.install`); a mismatch is refused.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from debian.arfile import GLOBAL_HEADER as AR_MAGIC

from . import extract
from .archive import Context, DebianArchive, Settings, SourceError, default_keyrings
from .cache import SymbolCache, VerifyError
from .identify import TargetIdent
from .net import FetchError, NotFound

__all__ = [
    "Settings", "SourceError", "SourceSkip", "Found", "Attempt", "ObjectResult", "FetchResult",
    "DebianArchive", "DebianSource", "UbuntuSource", "DebuginfodSource", "LocalSource",
    "SOURCES", "fetch_symbols", "default_keyrings", "Context",
]

DEFAULT_UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu"
DEFAULT_UBUNTU_PORTS_MIRROR = "http://ports.ubuntu.com/ubuntu-ports"
DEFAULT_UBUNTU_DDEBS = "http://ddebs.ubuntu.com"
DEFAULT_LAUNCHPAD = "https://launchpad.net"


class SourceSkip(SourceError):
    """A source does not apply to this target (not an error)."""


@dataclass
class Found:
    path: str              # debug file (in the work dir or in place)
    build_id: str          # the build-id it is offered for
    origin: str            # e.g. "debian bullseye/main libc6-dbg 2.31-13+deb11u11"
    verified: list[str]    # checks passed before the build-id check
    move: bool = True      # may be moved into the cache (False: a user's file)


@dataclass
class Attempt:
    source: str
    ok: bool
    reason: str
    seconds: float
    found: list[str] = field(default_factory=list)


@dataclass
class ObjectResult:
    name: str
    path: str | None
    build_id: str | None
    status: str                    # loaded / not loaded yet / file
    glibc_version: str | None
    package_version: str | None
    debug_file: str | None = None
    origin: str | None = None      # where the symbols came from ("cache: …" when reused)
    verified: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class FetchResult:
    ident: TargetIdent
    cache_dir: str
    debug_dir: str
    objects: list[ObjectResult]
    attempts: list[Attempt]

    @property
    def ok(self) -> bool:
        return all(o.debug_file for o in self.objects)

    def to_dict(self) -> dict:
        return {
            "schema": "gdbdiag.symbols/1",
            "ok": self.ok,
            "target": {k: v for k, v in self.ident.to_dict().items() if k != "objects"},
            "objects": [asdict(o) for o in self.objects],
            "cache_dir": self.cache_dir,
            "debug_file_directory": self.debug_dir,
            "attempts": [asdict(a) for a in self.attempts],
        }


def _deb_filename_version(v: str) -> str:
    return v.split(":", 1)[1] if ":" in v else v


# ---------------------------------------------------------------------------------
# Debian (the archive itself: .archive)
# ---------------------------------------------------------------------------------


class DebianSource:
    name = "debian"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.archive = DebianArchive(ctx)

    def fetch(self, ident: TargetIdent, wanted: set[str], work: str) -> list[Found]:
        ver, arch = ident.package_version, ident.arch or "amd64"
        if not ver:
            raise SourceSkip("the target's libc6 package version is unknown (no dpkg status, no Debian banner)")
        if "ubuntu" in ver:
            raise SourceSkip(f"{ver} is an Ubuntu build, not Debian")
        if (ident.distro.get("id") not in (None, "debian") and "debian" not in (ident.distro.get("id_like") or "")
                and not (ident.glibc_banner or "").startswith("Debian")):
            raise SourceSkip(f"not a Debian system ({ident.distro.get('id')})")
        suites = self.archive.suites_for(ver, ident.distro.get("codename"))
        ent, base, suite, signer, notes = self.archive.find("libc6-dbg", ver, arch, suites)
        deb = self.archive.download(ent, base, work)
        try:
            cands = extract.scan_deb(deb, wanted, work, use_dpkg=self.ctx.settings.use_dpkg)
        except extract.ExtractError as e:
            raise SourceError(f"{os.path.basename(deb)}: {e}") from None
        finally:
            os.unlink(deb)
        origin = f"debian {suite} libc6-dbg {ver}"
        verified = [f"InRelease gpgv ({signer})", "Packages SHA256", ".deb SHA256"] + notes
        return [_found(c, origin, verified) for c in cands]


def _found(c: extract.DebugCandidate, origin: str, verified: list[str], move: bool = True) -> Found:
    bid = extract._bid_from_name(c.member) or c.build_id
    return Found(c.path, bid, origin, list(verified), move)


# ---------------------------------------------------------------------------------
# Ubuntu
# ---------------------------------------------------------------------------------
class UbuntuSource:
    name = "ubuntu"

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def urls(self, version: str, arch: str) -> list[str]:
        s = self.ctx.settings
        v = _deb_filename_version(version)
        archive = s.ubuntu_mirror or (DEFAULT_UBUNTU_MIRROR if arch in ("amd64", "i386") else DEFAULT_UBUNTU_PORTS_MIRROR)
        ddebs = s.ubuntu_ddebs or (s.ubuntu_mirror if s.ubuntu_mirror else DEFAULT_UBUNTU_DDEBS)
        lp = s.launchpad_url or (None if s.ubuntu_mirror else DEFAULT_LAUNCHPAD)
        out = [f"{archive.rstrip('/')}/pool/main/g/glibc/libc6-dbg_{v}_{arch}.deb",
               f"{ddebs.rstrip('/')}/pool/main/g/glibc/libc6-dbgsym_{v}_{arch}.ddeb"]
        if lp:
            out += [f"{lp.rstrip('/')}/ubuntu/+archive/primary/+files/libc6-dbg_{v}_{arch}.deb",
                    f"{lp.rstrip('/')}/ubuntu/+archive/primary/+files/libc6-dbgsym_{v}_{arch}.ddeb"]
        return list(dict.fromkeys(out))

    def fetch(self, ident: TargetIdent, wanted: set[str], work: str) -> list[Found]:
        s = self.ctx.settings
        ver, arch = ident.package_version, ident.arch or "amd64"
        if not ver:
            raise SourceSkip("the target's libc6 package version is unknown")
        explicit = bool(s.ubuntu_mirror or s.ubuntu_ddebs or s.launchpad_url)
        if not explicit and "ubuntu" not in ver and ident.distro.get("id") != "ubuntu":
            raise SourceSkip(f"{ver} is not an Ubuntu build (set --ubuntu-mirror to try anyway)")
        out: list[Found] = []
        need = set(wanted)
        errors = []
        for url in self.urls(ver, arch):
            if not need:
                break
            dest = os.path.join(work, f"ubuntu-{len(errors)}-{os.path.basename(url)}")
            try:
                self.ctx.download(url, dest)
            except NotFound:
                errors.append(f"not found: {url}")
                continue
            except FetchError as e:
                errors.append(str(e))
                continue
            try:
                cands = extract.scan_deb(dest, need, work, use_dpkg=s.use_dpkg)
            except extract.ExtractError as e:
                errors.append(f"{os.path.basename(url)}: {e}")
                continue
            finally:
                os.unlink(dest)
            kind = "ddebs" if url.endswith(".ddeb") else ("launchpad" if "+files" in url else "archive")
            for c in cands:
                f = _found(c, f"ubuntu {kind} {os.path.basename(url)}",
                           ["no archive signature checked (Ubuntu source)"])
                out.append(f)
                if f.build_id in need and c.build_id == f.build_id:
                    need.discard(f.build_id)
        if not out:
            raise SourceError("; ".join(errors[-2:]) if errors else "no debug files found")
        return out


# ---------------------------------------------------------------------------------
# debuginfod
# ---------------------------------------------------------------------------------
class DebuginfodSource:
    name = "debuginfod"

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def fetch(self, ident: TargetIdent, wanted: set[str], work: str) -> list[Found]:
        urls = self.ctx.settings.debuginfod_urls
        if not urls:
            raise SourceSkip("no debuginfod server (DEBUGINFOD_URLS / --debuginfod-url)")
        out, errors = [], []
        for bid in sorted(wanted):
            for base in urls:
                url = f"{base.rstrip('/')}/buildid/{bid}/debuginfo"
                dest = os.path.join(work, f"debuginfod-{bid}-{len(errors)}.debug")
                try:
                    self.ctx.download(url, dest, label=f"debuginfod {bid[:12]}")
                except NotFound:
                    errors.append(f"{bid[:12]}… not on {base}")
                    continue
                except FetchError as e:
                    errors.append(str(e))
                    continue
                out.append(Found(dest, bid, f"debuginfod {base}", ["served by build-id"]))
                break
        if not out:
            raise SourceError("; ".join(dict.fromkeys(errors)) if errors else "nothing found")
        return out


# ---------------------------------------------------------------------------------
# local
# ---------------------------------------------------------------------------------
class LocalSource:
    name = "local"

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def fetch(self, ident: TargetIdent, wanted: set[str], work: str) -> list[Found]:
        paths = self.ctx.settings.local
        if not paths:
            raise SourceSkip("no --local path given")
        out, errors = [], []
        for p in paths:
            if os.path.isdir(p):
                for c in extract.scan_dir(p, wanted):
                    out.append(_found(c, f"local dir {p}", [], move=False))
                continue
            if not os.path.isfile(p):
                errors.append(f"no such file: {p}")
                continue
            with open(p, "rb") as f:
                head = f.read(len(AR_MAGIC))
            if head == AR_MAGIC:
                try:
                    for c in extract.scan_deb(p, wanted, work, use_dpkg=self.ctx.settings.use_dpkg):
                        out.append(_found(c, f"local package {p}", []))
                except extract.ExtractError as e:
                    errors.append(f"{p}: {e}")
            elif head[:4] == b"\x7fELF":
                c = extract.scan_file(p, wanted)
                if c:
                    # a single file is offered for every wanted id: the check decides
                    for bid in (wanted if c.build_id not in wanted else {c.build_id}):
                        out.append(Found(p, bid, f"local file {p}", [], move=False))
            else:
                errors.append(f"{p}: neither a package, a directory nor an ELF file")
        if not out:
            raise SourceError("; ".join(errors) if errors else f"no debug file for the target in {', '.join(paths)}")
        return out


SOURCES = {"debian": DebianSource, "ubuntu": UbuntuSource, "debuginfod": DebuginfodSource, "local": LocalSource}


# ---------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------
def _cached_origin(meta: dict | None) -> str:
    if not meta:
        return "cache"
    return f"cache ({meta.get('origin', '?')})"


def fetch_symbols(ident: TargetIdent, settings: Settings | None = None, cache: SymbolCache | str | None = None) -> FetchResult:
    """Find, verify and cache the debug file of every object of ``ident``.

    Cached files are used first (no network); then the sources in
    ``settings.sources`` order until every object has its file.  Nothing that fails
    verification enters the cache."""
    settings = settings or Settings()
    if not isinstance(cache, SymbolCache):
        cache = SymbolCache(cache)
    results = [ObjectResult(o.name, o.path, o.build_id, o.status, o.glibc_version, o.package_version)
               for o in ident.objects]
    res = FetchResult(ident, cache.root, cache.debug_dir, results, [])
    by_bid = _from_cache(results, cache)
    if not by_bid:
        return res
    if settings.offline:
        for rs in by_bid.values():
            for r in rs:
                r.error = "not in the cache (--offline)"
        res.attempts.append(Attempt("cache", False, f"{len(by_bid)} object(s) not in {cache.debug_dir} and --offline", 0.0))
        return res
    ctx = Context(settings, cache)
    cache.clean_tmp()
    for name in settings.sources:
        if not by_bid:
            break
        res.attempts.append(_try_source(name, ctx, ident, by_bid))
    _explain_missing(res, by_bid)
    return res


def _from_cache(results: list[ObjectResult], cache: SymbolCache) -> dict[str, list[ObjectResult]]:
    """Fill in the objects whose debug file is cached; {build-id: [objects]} of the rest
    (objects without a build-id get their error and are left out)."""
    by_bid: dict[str, list[ObjectResult]] = {}
    for r in results:
        if not r.build_id:
            r.error = "object has no GNU build-id: cannot match debug files"
            continue
        p = cache.lookup(r.build_id)
        if p:
            meta = cache.meta(r.build_id) or {}
            r.debug_file, r.origin = p, _cached_origin(meta)
            r.verified = list(meta.get("verified", [])) + ["build-id (re-checked)"]
        else:
            by_bid.setdefault(r.build_id, []).append(r)
    return by_bid


def _try_source(name: str, ctx: Context, ident: TargetIdent, by_bid: dict[str, list[ObjectResult]]) -> Attempt:
    """Ask source ``name`` for the debug files still missing (``by_bid``, updated: what
    is verified and cached leaves it); the attempt, as reported."""
    cls = SOURCES.get(name)
    if cls is None:
        return Attempt(name, False, f"unknown source {name!r} (known: {', '.join(SOURCES)})", 0.0)
    t0 = time.monotonic()
    work = ctx.cache.tmpdir()
    try:
        try:
            founds = cls(ctx).fetch(ident, set(by_bid), work)
        except SourceSkip as e:
            return Attempt(name, False, f"skipped: {e}", time.monotonic() - t0)
        except (SourceError, FetchError, extract.ExtractError) as e:
            return Attempt(name, False, str(e), time.monotonic() - t0)
        except OSError as e:
            return Attempt(name, False, f"{type(e).__name__}: {e}", time.monotonic() - t0)
        installed, refused = _install_found(name, ctx.cache, founds, by_bid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dt = time.monotonic() - t0
    if installed and not refused:
        return Attempt(name, True, f"{len(installed)} debug file(s) verified and cached", dt, installed)
    if installed:
        return Attempt(name, True, f"{len(installed)} cached; " + "; ".join(refused), dt, installed)
    if refused:
        return Attempt(name, False, "; ".join(refused), dt)
    missing = ", ".join(sorted({r.name for rs in by_bid.values() for r in rs}))
    return Attempt(name, False, f"no matching debug file for {missing}", dt)


def _install_found(source: str, cache: SymbolCache, founds: list[Found],
                   by_bid: dict[str, list[ObjectResult]]) -> tuple[list[str], list[str]]:
    """Verify and cache what a source found: (build-ids installed, refusals)."""
    installed, refused = [], []
    for f in founds:
        if f.build_id not in by_bid:
            continue
        meta = {"origin": f.origin, "verified": f.verified + ["build-id"], "source": source,
                "object": by_bid[f.build_id][0].name,
                "package_version": by_bid[f.build_id][0].package_version}
        try:
            dst = cache.install(f.build_id, f.path, meta, move=f.move)
        except VerifyError as e:
            refused.append(f"{by_bid[f.build_id][0].name}: {f.origin}: refused: {e}")
            continue
        for r in by_bid.pop(f.build_id):
            r.debug_file, r.origin, r.verified, r.error = dst, f.origin, meta["verified"], None
        installed.append(f.build_id)
    return installed, refused


def _explain_missing(res: FetchResult, by_bid: dict[str, list[ObjectResult]]) -> None:
    """Each object still without a debug file gets the first failure (else the skips)."""
    fails = [f"{a.source}: {a.reason}" for a in res.attempts if not a.ok and not a.reason.startswith("skipped")]
    skips = [f"{a.source}: {a.reason}" for a in res.attempts if not a.ok and a.reason.startswith("skipped")]
    for rs in by_bid.values():
        for r in rs:
            r.error = fails[0] if fails else ("; ".join(skips) if skips else "no source tried")
