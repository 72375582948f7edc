"""The glibc facts of a report: version, package, build-id, and bug 30081 decided from
send_dg's code (by the plugin) cross-checked with debian-symbols/ (pure file reads)."""
from __future__ import annotations


def glibc_facts(pid: int, from_code: dict | None = None) -> dict:
    from . import debdata, identify
    from_code = from_code or {}
    code = from_code.get("affected_30081")
    out = {"version": None, "distro_package": None, "build_id": None, "distro": None,
           "affected_30081": code, "affected_source": "code" if code is not None else None,
           "sticky_field": from_code.get("sticky_field"),
           "send_dg_object": from_code.get("send_dg_object"),
           "bug31890_fixed": from_code.get("bug31890_fixed"), "debian_symbols": None}
    try:
        ident = identify.identify_process(pid)
    except Exception as exc:                 # a report is still useful without it
        out["identify_error"] = str(exc)
        return out
    libc = ident.object("libc.so.6")
    out.update(version=ident.glibc_version, distro=(ident.distro or {}).get("pretty_name"),
               distro_package=(f"{ident.package or 'libc6'} {ident.package_version}"
                               if ident.package_version else None),
               build_id=libc.build_id if libc else None)
    try:
        chk = debdata.check_target(ident)
    except Exception as exc:
        out["debian_symbols"] = {"error": str(exc)}
        return out
    data_says = chk.get("affected")
    out["debian_symbols"] = {"affected": data_says, "matched_by": chk.get("matched_by"),
                             "fixed_by": chk.get("fixed_by"),
                             "sticky_field": chk.get("sticky_field")}
    if code is None and data_says is not None:
        out["affected_30081"], out["affected_source"] = data_says, "debian-symbols"
    elif code is not None and data_says is not None:
        out["affected_source"] = "code, agrees with debian-symbols" if code == data_says else \
            "code (debian-symbols disagrees: %s)" % data_says
    if out["sticky_field"] is None:
        out["sticky_field"] = chk.get("sticky_field")
    return out


def resolv_conf_single_request(pid: int) -> bool | None:
    """Does the target's own /etc/resolv.conf say single-request(-reopen)? Read inside its
    root (absolute symlinks resolved there, never on the host); None when unreadable."""
    from .rootfs import SafeRoot
    try:
        text = SafeRoot("/proc/%d/root" % pid).read_text("/etc/resolv.conf")
    except Exception:
        return None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "options" and any(p.startswith("single-request") for p in parts[1:]):
            return True
    return False
