"""`gdbdiag scan`: every glibc process of a node (or of some containers, or some PIDs),
read through /proc only — never a ptrace stop.

One pass (:class:`~gdbdiag.scan.scanner.Scanner`):

1. :mod:`.targets` — which processes: all of /proc, ``--pid``, or ``--container`` (runc
   state, podman names, cgroup membership);
2. :mod:`.classify` — cheap /proc reads per process: kernel threads, zombies, exited,
   unreadable, static, musl, Go and other non-glibc programs are *skipped with a reason*;
   glibc processes are grouped by the (dev, inode) of their libc mapping;
3. :mod:`.builds` — per group, one build-id read; per build-id, one analysis
   (:func:`gdbdiag.glibc.analyzer.analyze_target`: bug 30081 from send_dg's code,
   cached on disk by build-id) and one package identification;
4. :mod:`.threads` — per process, each thread's ``_res`` (sticky bit, which field) and
   its resolver wait now, from ``/proc/PID/mem`` and ``task/TID/syscall``
   (:class:`gdbdiag.passive.PassiveSampler`, with a :class:`~gdbdiag.passive.FileFacts`
   memo shared by the whole node); :mod:`.clock` says how long a wait has lasted;
5. :mod:`.render` (table, JSON), :mod:`.prom` (Prometheus textfile), :mod:`.watch`
   (JSON lines for transitions across passes), :mod:`.bench` (scale figures).
"""

SCHEMA = "gdbdiag.scan/1"
