"""Lab workload: one thread per name, each resolving its name every INTERVAL seconds.

Runs inside the lab container with the container's own python3 (3.9 on bullseye), so
socket.getaddrinfo() is the container's glibc getaddrinfo(). Each thread has its own
resolver state (_res is thread-local), which is what makes the sticky serial mode of
glibc per thread. Every lookup is one JSON line in --out.
"""
import argparse
import ctypes
import json
import socket
import sys
import threading
import time

PR_SET_NAME = 15


def set_thread_name(name):
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=6379)
    args = ap.parse_args()
    lock = threading.Lock()
    out = open(args.out, "a", buffering=1)

    def worker(name):
        label = "res-" + name.split(".")[0]
        set_thread_name(label)
        tid = threading.get_native_id()
        while True:
            t0 = time.time()
            m0 = time.monotonic()
            try:
                res = socket.getaddrinfo(name, args.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
                result, error = sorted({r[4][0] for r in res}), None
            except socket.gaierror as e:
                result, error = [], "%s (%s)" % (e.strerror, e.errno)
            dur = time.monotonic() - m0
            rec = {"t": t0, "thread": label, "tid": tid, "name": name,
                   "seconds": round(dur, 6), "result": result, "error": error}
            with lock:
                out.write(json.dumps(rec) + "\n")
            time.sleep(max(0.0, args.interval - dur))

    threads = [threading.Thread(target=worker, args=(n,), name="res-" + n.split(".")[0],
                                daemon=True) for n in args.names]
    for t in threads:
        t.start()
    print("resolver: started %d threads: %s" % (len(threads), " ".join(args.names)), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
