"""CPU seconds per thread of one process (utime + stime from /proc/PID/task/TID/stat), between two
snapshots: `snap PID FILE` writes one, `diff FILE PID REQUESTS` prints ms per request per thread.
Exact CPU time, unlike sampling, which on a busy 2-core machine also counts time a runnable thread
waits for a core."""

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, tuple[str, float]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def main() -> None:
    if sys.argv[1] == "snap":
        Path(sys.argv[3]).write_text(json.dumps(threads(int(sys.argv[2]))))
        return
    before = json.loads(Path(sys.argv[2]).read_text())
    after = threads(int(sys.argv[3]))
    requests = int(sys.argv[4])
    by_thread: dict[str, float] = defaultdict(float)
    main_tid = sys.argv[3]
    for tid, (name, cpu) in after.items():
        label = "main thread" if tid == main_tid else f"{name} [{tid}]"
        by_thread[label] += cpu - (before[tid][1] if tid in before else 0.0)
    total = sum(by_thread.values())
    for name, cpu in sorted(by_thread.items(), key=lambda kv: -kv[1]):
        if cpu > 0:
            print(f"  {name:24} {cpu * 1e3 / requests:6.2f} ms/req")
    print(f"  {'whole process':24} {total * 1e3 / requests:6.2f} ms/req")


if __name__ == "__main__":
    main()
