"""Debian's archive, signed: InRelease (gpgv, the Debian archive keyrings) → Packages /
Sources (SHA256 from InRelease) → .deb / source files (SHA256 and size from the index).

Shared by the debug symbols (:mod:`.sources`), glibc's source (:mod:`.glibcsrc`) and the
archive's libc6 builds (:mod:`gdbdiag.glibc.builds`); :class:`Settings` and
:class:`Context` are the settings and per-run state of every fetch.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from ..errors import GdbdiagError
from .cache import SymbolCache, atomic_write_bytes, atomic_write_json
from .net import FetchError, NotFound, http_download, http_get

__all__ = ["Settings", "Context", "SourceError", "DebianArchive", "default_keyrings",
           "DEFAULT_DEBIAN_MIRROR", "DEFAULT_DEBIAN_SECURITY_MIRROR", "DEBIAN_RELEASES"]

DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEFAULT_DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

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


class SourceError(GdbdiagError):
    """A source failed; str() is the one-line reason."""


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
