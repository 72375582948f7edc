"""Kernel-owned probes: uprobes on the probe points the analyzer finds, run by bpftrace.

The kernel owns every probe: it inserts and removes the breakpoints, the BPF programs
read registers and memory at the probe and go on, nothing ever stops the target, and
when the process that owns the probes (bpftrace) dies by any signal the kernel removes
them with its file descriptors. See docs/kernel-probes.md for why bpftrace.

- :mod:`.program` writes the bpftrace program for a probe plan and a mode;
- :mod:`.records` turns its output lines into the core's events (pure);
- :mod:`.owner` runs bpftrace (the owner of the probes) and hands back records;
- :mod:`.run` is the batch run (attach, pod, replay, bench) on these probes.
"""
