"""What the soak runs: the names, the one that goes sticky, the rate, the criteria."""

NAMES = tuple(f"soak-{i}.keydb" for i in range(5))
STICKY = NAMES[2]                   # the one name whose AAAA answer is lost, once
LOOKUP_INTERVAL = 0.1               # per thread: 5 x 10/s = 50 lookups/s
RECORDS = tuple(r for i, n in enumerate(NAMES)
                for r in (f"{n}=A:10.244.2.{10 + i}", f"{n}=AAAA:fd00::2:{10 + i}"))
# "flat": the criterion, printed with the verdict
RSS_FLAT_KB = 5 * 1024              # RSS never more than 5 MB above its value after interval 1
CPU_FLAT_POINTS = 1.0               # CPU%: last third's mean within max(1 point, 25 %) of the
CPU_FLAT_SHARE = 0.25               # first third's (interval 1, the arming, left out)
VERDICTS = ("HEALTHY", "STICKY_NO_STALL", "STICKY_STALLING", "STALLING_NOT_STICKY")
