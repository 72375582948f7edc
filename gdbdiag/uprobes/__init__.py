"""Kernel-owned probes: uprobes at the probe points the analyzer finds, each running a
small eBPF program that reads the registers and memory gdb's probes read.

The kernel owns every probe: it inserts and removes the breakpoints, the programs read
and go on, nothing ever stops the target, and when the process holding the probes' file
descriptors ends — by any signal — the kernel removes them. See docs/kernel-probes.md.

- :mod:`.bpf` the bpf(2)/perf_event_open(2) interface and an eBPF assembler;
- :mod:`.program` the probes' programs and record layouts for a probe plan and a mode;
- :mod:`.plan` from the analyzer's findings to a plan (file offsets in the target's root);
- :mod:`.owner` attaches them and reads their ring buffer;
- :mod:`.records` turns records into the core's events (pure);
- :mod:`.run` is the batch run (attach, pod, replay, bench) on these probes.
"""
