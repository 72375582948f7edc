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

import glob
import hashlib
import json
import lzma
import gzip
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime

from . import extract
from .cache import SymbolCache, VerifyError, atomic_write_bytes, atomic_write_json
from .identify import TargetIdent
from .net import FetchError, NotFound, http_download, http_get

__all__ = [
    "Settings", "SourceError", "SourceSkip", "Found", "Attempt", "ObjectResult", "FetchResult",
    "DebianArchive", "DebianSource", "UbuntuSource", "DebuginfodSource", "LocalSource",
    "SOURCES", "fetch_symbols", "default_keyrings", "Context",
]

DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEFAULT_DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEFAULT_UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu"
DEFAULT_UBUNTU_PORTS_MIRROR = "http://ports.ubuntu.com/ubuntu-ports"
DEFAULT_UBUNTU_DDEBS = "http://ddebs.ubuntu.com"
DEFAULT_LAUNCHPAD = "https://launchpad.net"

# (family, suite, which mirror); the order within a family is the search order
DEBIAN_RELEASES = ["bullseye", "bookworm", "trixie"]
DEBIAN_NUMBERS = {"11": "bullseye", "12": "bookworm", "13": "trixie"}


def _env(name: str, default=None):
    v = os.environ.get(name)
    return v if v else default


def default_keyrings() -> list[str]:
    env = _env("GDBDIAG_KEYRINGS")
    if env:
        return [k for k in env.split(":") if k]
    ks = ["/usr/share/keyrings/debian-archive-keyring.gpg"]
    ks += sorted(k for k in glob.glob("/usr/share/keyrings/debian-archive-*.gpg")
                 if "removed" not in os.path.basename(k) and k not in ks)
    return [k for k in ks if os.path.isfile(k)]


@dataclass
class Settings:
    sources: list[str] = field(default_factory=lambda: ["debian", "ubuntu", "debuginfod", "local"])
    timeout: float = 30.0
    offline: bool = False
    debian_mirror: str = field(default_factory=lambda: _env("GDBDIAG_DEBIAN_MIRROR", DEFAULT_DEBIAN_MIRROR))
    debian_security_mirror: str = field(
        default_factory=lambda: _env("GDBDIAG_DEBIAN_SECURITY_MIRROR", DEFAULT_DEBIAN_SECURITY_MIRROR))
    debian_suites: list[str] | None = None         # override the suite search order
    ubuntu_mirror: str | None = field(default_factory=lambda: _env("GDBDIAG_UBUNTU_MIRROR"))
    ubuntu_ddebs: str | None = field(default_factory=lambda: _env("GDBDIAG_UBUNTU_DDEBS"))
    launchpad_url: str | None = field(default_factory=lambda: _env("GDBDIAG_LAUNCHPAD_URL"))
    debuginfod_urls: list[str] = field(default_factory=lambda: _env("DEBUGINFOD_URLS", "").split())
    local: list[str] = field(default_factory=list)
    keyrings: list[str] = field(default_factory=default_keyrings)
    index_ttl: float = field(default_factory=lambda: float(_env("GDBDIAG_INDEX_TTL", "3600")))
    progress: bool | None = None                   # None: when stderr is a terminal
    use_dpkg: bool | None = None                   # None: dpkg-deb when installed
    allow_expired: bool = True                     # accept a signed InRelease past Valid-Until (noted)


class SourceError(Exception):
    """A source failed; str() is the one-line reason."""


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


class Context:
    """Per-run state shared by the sources: settings, cache, hosts that did not answer."""

    def __init__(self, settings: Settings, cache: SymbolCache):
        self.settings = settings
        self.cache = cache
        self.dead: dict[str, str] = {}

    def check_host(self, url: str):
        host = urllib.parse.urlsplit(url).netloc
        if host in self.dead:
            raise FetchError(self.dead[host])

    def mark_dead(self, url: str, err: FetchError):
        if not isinstance(err, NotFound) and not str(err).startswith("HTTP "):
            self.dead[urllib.parse.urlsplit(url).netloc] = str(err)

    def get(self, url: str, **kw) -> bytes:
        self.check_host(url)
        try:
            return http_get(url, timeout=self.settings.timeout, **kw)
        except FetchError as e:
            self.mark_dead(url, e)
            raise

    def download(self, url: str, dest: str, **kw) -> str:
        self.check_host(url)
        try:
            return http_download(url, dest, timeout=self.settings.timeout, progress=self.settings.progress, **kw)
        except FetchError as e:
            self.mark_dead(url, e)
            raise


def _slug(url: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")
    return s[:80] + "-" + hashlib.sha256(url.encode()).hexdigest()[:8]


def _deb_filename_version(v: str) -> str:
    return v.split(":", 1)[1] if ":" in v else v


# ---------------------------------------------------------------------------------
# Debian archive
# ---------------------------------------------------------------------------------
class DebianArchive:
    """Signed Debian archive access: InRelease (gpgv) -> Packages (SHA256) -> .deb (SHA256)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.s = ctx.settings

    # suites ------------------------------------------------------------------
    def all_suites(self) -> list[tuple[str, str]]:
        out = []
        for r in DEBIAN_RELEASES:
            out += [(self.s.debian_mirror, r), (self.s.debian_security_mirror, f"{r}-security"),
                    (self.s.debian_mirror, f"{r}-updates")]
        out.append((self.s.debian_mirror, "sid"))
        return out

    def suites_for(self, version: str | None, codename: str | None = None) -> list[tuple[str, str]]:
        """Search order: the release family named by ``+debNNu`` (only it), else the
        target's codename family first, then all the others."""
        allsuites = self.all_suites()
        if self.s.debian_suites:
            byname = {s: (b, s) for b, s in allsuites}
            return [byname.get(s) or ((self.s.debian_security_mirror if s.endswith("-security")
                                       else self.s.debian_mirror), s) for s in self.s.debian_suites]
        fam = None
        m = re.search(r"\+deb(\d+)u\d+", version or "")
        if m and m.group(1) in DEBIAN_NUMBERS:
            fam = DEBIAN_NUMBERS[m.group(1)]
            return [(b, s) for b, s in allsuites if s.split("-")[0] == fam]
        fam = (codename or "").split("/")[0] or None
        first = [(b, s) for b, s in allsuites if fam and s.split("-")[0] == fam]
        return first + [x for x in allsuites if x not in first]

    # InRelease ---------------------------------------------------------------
    def _gpgv(self, path: str) -> tuple[str, str]:
        if not self.s.keyrings:
            raise SourceError("no Debian archive keyring found (install debian-archive-keyring)")
        if not shutil.which("gpgv"):
            raise SourceError("gpgv is not installed (apt-get install gpgv)")
        cmd = ["gpgv"]
        for k in self.s.keyrings:
            cmd += ["--keyring", k]
        cmd += ["--output", "-", path]
        p = subprocess.run(cmd, capture_output=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
        err = p.stderr.decode("utf-8", "replace")
        if p.returncode != 0:
            bad = [ln for ln in err.splitlines() if "BAD signature" in ln or "Can't check" in ln
                   or "no valid OpenPGP" in ln or "not found" in ln]
            raise SourceError(f"InRelease signature check failed ({(bad or err.splitlines() or ['gpgv error'])[-1].replace('gpgv: ', '').strip()})")
        goods = re.findall(r'Good signature from "([^"]+)"', err)
        return p.stdout.decode("utf-8", "replace"), (goods[-1] if goods else "valid signature")

    def release(self, base: str, suite: str):
        """The verified Release paragraph of ``suite`` (deb822.Release) and the signer.
        Cached under CACHE/index; re-downloaded after ``index_ttl`` seconds; always
        re-verified with gpgv."""
        from debian import deb822

        d = os.path.join(self.ctx.cache.index_dir, "debian", _slug(base), suite)
        raw_path = os.path.join(d, "InRelease")
        fresh = os.path.isfile(raw_path) and time.time() - os.path.getmtime(raw_path) < self.s.index_ttl
        url = f"{base.rstrip('/')}/dists/{suite}/InRelease"
        if not fresh:
            try:
                data = self.ctx.get(url, max_bytes=16 << 20)
            except NotFound:
                raise SourceError(f"{suite}: no InRelease at {url}") from None
            tmpdir = self.ctx.cache.tmpdir()
            try:
                tmp = os.path.join(tmpdir, "InRelease")
                with open(tmp, "wb") as f:
                    f.write(data)
                self._gpgv(tmp)      # only a verified file enters the cache
                atomic_write_bytes(raw_path, data)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        text, signer = self._gpgv(raw_path)
        rel = deb822.Release(text)
        if rel.get("Suite") is None and rel.get("Codename") is None:
            raise SourceError(f"{suite}: InRelease has no Suite/Codename")
        return rel, signer

    # Packages / Sources -------------------------------------------------------
    def _signed_index(self, base: str, suite: str, stem: str, parse) -> tuple[dict, str, list[str]]:
        """Fetch ``dists/SUITE/STEM{.xz,.gz,}`` by the SHA256 listed in the verified
        InRelease, parse it with ``parse(text) -> dict`` and cache the result by that
        hash (so an unchanged index is never downloaded twice)."""
        rel, signer = self.release(base, suite)
        notes = []
        vu = rel.get("Valid-Until")
        if vu:
            try:
                if parsedate_to_datetime(vu).timestamp() < time.time():
                    if not self.s.allow_expired:
                        raise SourceError(f"{suite}: InRelease expired on {vu}")
                    notes.append(f"{suite} InRelease past Valid-Until ({vu})")
            except (TypeError, ValueError):
                pass
        files = {e["name"]: e for e in rel.get("SHA256", [])}
        chosen = None
        for ext in (".xz", ".gz", ""):
            if stem + ext in files:
                chosen = (stem + ext, files[stem + ext])
                break
        if chosen is None:
            raise SourceError(f"{suite}: no {stem} listed in InRelease")
        name, e = chosen
        sha, size = e["sha256"].lower(), int(e["size"])
        parsed_path = os.path.join(self.ctx.cache.index_dir, "parsed", f"{parse.__name__}-{sha}.json")
        try:
            with open(parsed_path) as f:
                return json.load(f), signer, notes
        except (OSError, ValueError):
            pass
        dirpart = os.path.dirname(name)
        urls = []
        if str(rel.get("Acquire-By-Hash", "")).lower() == "yes":
            urls.append(f"{base.rstrip('/')}/dists/{suite}/{dirpart}/by-hash/SHA256/{sha}")
        urls.append(f"{base.rstrip('/')}/dists/{suite}/{name}")
        tmpdir = self.ctx.cache.tmpdir()
        try:
            last = None
            dest = os.path.join(tmpdir, os.path.basename(name))
            for url in urls:
                try:
                    self.ctx.download(url, dest, expect_size=size, expect_sha256=sha,
                                      label=f"{suite} {os.path.basename(name)}")
                    break
                except FetchError as ex:
                    last = ex
                    if not isinstance(ex, NotFound) and "SHA256" not in str(ex) and "bytes" not in str(ex):
                        raise SourceError(f"{suite}: {ex}") from None
            else:
                raise SourceError(f"{suite}: {last}")
            with open(dest, "rb") as f:
                raw = f.read()
            if name.endswith(".xz"):
                raw = lzma.decompress(raw)
            elif name.endswith(".gz"):
                raw = gzip.decompress(raw)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        index = parse(raw.decode("utf-8", "replace"))
        atomic_write_json(parsed_path, index)
        return index, signer, notes

    def packages(self, base: str, suite: str, arch: str, component: str = "main") -> tuple[dict, str, list[str]]:
        """{package: [entries]} of the glibc binaries in ``suite``, the signer, notes."""
        return self._signed_index(base, suite, f"{component}/binary-{arch}/Packages", _parse_glibc_packages)

    def sources(self, base: str, suite: str, component: str = "main") -> tuple[dict, str, list[str]]:
        """{version: entry} of the glibc source packages in ``suite``."""
        return self._signed_index(base, suite, f"{component}/source/Sources", _parse_glibc_sources)

    def find_source(self, package: str, version: str, suites) -> dict | None:
        for base, suite in suites:
            try:
                idx, _signer, _notes = self.sources(base, suite)
            except (SourceError, FetchError):
                continue
            ent = idx.get(version)
            if ent and ent["Package"] == package:
                return dict(ent, base=base, suite=suite)
        return None

    def download_source_file(self, ent: dict, name: str, dest_dir: str) -> str:
        f = next(x for x in ent["files"] if x["name"] == name)
        url = f"{ent['base'].rstrip('/')}/{ent['Directory']}/{name}"
        dest = os.path.join(dest_dir, name)
        try:
            self.ctx.download(url, dest, expect_size=f["size"], expect_sha256=f["sha256"], label=name)
        except FetchError as e:
            raise SourceError(str(e)) from None
        return dest

    def find(self, package: str, version: str, arch: str, suites) -> tuple[dict, str, str, str, list[str]]:
        """(entry, base, suite, signer, notes) of ``package`` = ``version`` on ``arch``
        in the first of ``suites`` that has it."""
        errors, tried = [], []
        for base, suite in suites:
            tried.append(suite)
            try:
                idx, signer, notes = self.packages(base, suite, arch)
            except FetchError as e:
                errors.append(f"{suite}: {e}")
                continue
            except SourceError as e:
                errors.append(str(e))
                continue
            for ent in idx.get(package, []):
                if ent["Version"] == version and ent["Architecture"] == arch:
                    return ent, base, suite, signer, notes
        hard = [e for e in errors]
        if hard and len(hard) == len(tried):
            raise SourceError(hard[0] if len(set(hard)) == 1 or len(hard) == 1 else f"{hard[0]} (and {len(hard) - 1} more suite(s) failed)")
        msg = f"{package} {version} ({arch}) is in none of {', '.join(tried)}"
        if hard:
            msg += f"; {len(hard)} suite(s) unreadable: {hard[0]}"
        raise SourceError(msg)

    def download(self, entry: dict, base: str, dest_dir: str) -> str:
        url = f"{base.rstrip('/')}/{entry['Filename']}"
        dest = os.path.join(dest_dir, os.path.basename(entry["Filename"]))
        try:
            self.ctx.download(url, dest, expect_size=entry["Size"], expect_sha256=entry["SHA256"],
                              label=os.path.basename(entry["Filename"]))
        except FetchError as e:
            raise SourceError(str(e)) from None
        return dest


def _parse_glibc_packages(text: str) -> dict:
    from debian import deb822

    index: dict[str, list[dict]] = {}
    for para in text.split("\n\n"):
        if not (para.startswith("Package: libc6") or "\nSource: glibc" in para):
            continue
        p = deb822.Packages(para)
        pkg = p.get("Package")
        if not pkg:
            continue
        index.setdefault(pkg, []).append({
            "Package": pkg, "Version": p.get("Version"), "Architecture": p.get("Architecture"),
            "Filename": p.get("Filename"), "Size": int(p.get("Size", "0")),
            "SHA256": (p.get("SHA256") or "").lower(), "Source": p.get("Source", pkg),
        })
    return index


def _parse_glibc_sources(text: str) -> dict:
    from debian import deb822

    index: dict[str, dict] = {}
    for para in text.split("\n\n"):
        if not para.startswith("Package: glibc\n"):
            continue
        p = deb822.Sources(para)
        index[p["Version"]] = {
            "Package": p["Package"], "Version": p["Version"], "Directory": p.get("Directory"),
            "files": [{"name": f["name"], "size": int(f["size"]), "sha256": f["sha256"].lower()}
                      for f in p.get("Checksums-Sha256", [])],
        }
    return index


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
                head = f.read(8)
            if head == b"!<arch>\n":
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
        cls = SOURCES.get(name)
        if cls is None:
            res.attempts.append(Attempt(name, False, f"unknown source {name!r} (known: {', '.join(SOURCES)})", 0.0))
            continue
        t0 = time.monotonic()
        work = cache.tmpdir()
        installed, refused = [], []
        try:
            try:
                founds = cls(ctx).fetch(ident, set(by_bid), work)
            except SourceSkip as e:
                res.attempts.append(Attempt(name, False, f"skipped: {e}", time.monotonic() - t0))
                continue
            except (SourceError, FetchError, extract.ExtractError) as e:
                res.attempts.append(Attempt(name, False, str(e), time.monotonic() - t0))
                continue
            except OSError as e:
                res.attempts.append(Attempt(name, False, f"{type(e).__name__}: {e}", time.monotonic() - t0))
                continue
            for f in founds:
                if f.build_id not in by_bid:
                    continue
                meta = {"origin": f.origin, "verified": f.verified + ["build-id"], "source": name,
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
        finally:
            shutil.rmtree(work, ignore_errors=True)
        dt = time.monotonic() - t0
        if installed and not refused:
            res.attempts.append(Attempt(name, True, f"{len(installed)} debug file(s) verified and cached", dt, installed))
        elif installed:
            res.attempts.append(Attempt(name, True, f"{len(installed)} cached; " + "; ".join(refused), dt, installed))
        elif refused:
            res.attempts.append(Attempt(name, False, "; ".join(refused), dt))
        else:
            missing = ", ".join(sorted({r.name for rs in by_bid.values() for r in rs}))
            res.attempts.append(Attempt(name, False, f"no matching debug file for {missing}", dt))
    fails = [f"{a.source}: {a.reason}" for a in res.attempts if not a.ok and not a.reason.startswith("skipped")]
    skips = [f"{a.source}: {a.reason}" for a in res.attempts if not a.ok and a.reason.startswith("skipped")]
    for rs in by_bid.values():
        for r in rs:
            r.error = fails[0] if fails else ("; ".join(skips) if skips else "no source tried")
    return res
