#!/usr/bin/env python3
"""Peak resident memory of a command, overall and after a marker line on its stderr.

    bench-data/peak_rss.py [--marker REGEX] -- CMD ARGS...

Samples /proc/PID/status VmRSS every 20 ms (and reads VmHWM at the end) while CMD runs, passing
its stderr through. `cellstream embed` prints "model ... loaded and warmed in" once its plans
are built and the parsed graph released: the peak after that line is the peak *while
embedding*; the overall peak includes loading the model (parsing the ONNX file and building
the plans). Prints
`RSS peak_mib=X peak_after_marker_mib=Y` (MiB). Standard library only.
"""
import argparse, re, subprocess, sys, threading, time


def rss_kib(pid, key="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--marker", default=r"loaded and warmed in")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    marked = threading.Event()
    marker = re.compile(a.marker)

    def relay():
        for line in p.stderr:
            sys.stderr.write(line)
            if marker.search(line):
                marked.set()

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    peak = after = hwm = 0
    while p.poll() is None:
        r = rss_kib(p.pid)
        hwm = max(hwm, rss_kib(p.pid, "VmHWM"))
        peak = max(peak, r)
        if marked.is_set():
            after = max(after, r)
        time.sleep(0.02)
    t.join()
    peak = max(peak, hwm)
    print(f"RSS peak_mib={peak / 1024:.1f} peak_after_marker_mib={after / 1024:.1f}", flush=True)
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
