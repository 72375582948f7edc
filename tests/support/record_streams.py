"""Record the event streams of tests/data/streams/*.jsonl.gz: `gdbdiag attach --record` on
a bullseye Redis lab that loses one AAAA answer, once per source (kernel probes, gdb
breakpoints, passive samples). Run by hand when the event model changes:

    .venv/bin/python -m tests.support.record_streams [uprobe gdb passive]

Each stream gets a ``.meta.json`` with its source and the verdict of the run that wrote
it; tests/test_stream.py replays them.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gdbdiag.lab import container

OUT = Path(__file__).resolve().parents[1] / "data" / "streams"
ARGS = {"uprobe": [], "gdb": ["--backend", "gdb"], "passive": ["--passive"]}
READY = {"uprobe": "gdbdiag: armed in", "gdb": "gdbdiag: armed in",
         "passive": "gdbdiag: passive sampling of"}


def record(source: str, work: Path) -> None:
    lab = container.up(container.LabSpec(name=f"rec-{source}-{os.getpid() % 10000}",
                                         release="bullseye", workload="redis", fault="none"))
    try:
        stream, rep = work / f"{source}.jsonl", work / f"{source}.json"
        p = subprocess.Popen([sys.executable, "-m", "gdbdiag.cli", "attach", str(lab.pid),
                              *ARGS[source], "--duration", "60", "--until", "stall",
                              "--record", str(stream), "--json", str(rep)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        try:
            for line in p.stdout:
                print(line, end="", flush=True)
                if READY[source] in line:
                    lab.inject()
            p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        verdict = json.loads(rep.read_text())["verdict"]["code"]
        name = f"bullseye-redis-{source}"
        with open(stream, "rb") as src, gzip.open(OUT / f"{name}.jsonl.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        (OUT / f"{name}.meta.json").write_text(json.dumps(
            {"source": source, "verdict": verdict, "release": "bullseye", "workload": "redis",
             "fault": "one AAAA answer dropped once armed", "recorded": time.strftime("%Y-%m-%d")},
            indent=1) + "\n")
        print(f"== {name}: {verdict}", flush=True)
    finally:
        container.down(lab.name)


def main(argv: list[str]) -> int:
    work = Path(tempfile.mkdtemp(prefix="gdbdiag-rec-"))
    try:
        for source in argv or list(ARGS):
            record(source, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
