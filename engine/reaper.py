"""Ends the embedded Ray's processes when the driver that started them ends, however it ends.

Ray's gcs_server and raylet die with their parent, but the agents the raylet starts (dashboard
agent, runtime-env agent) and idle workers were seen listening for 30-90 s after a kill -9 of the
driver. `cluster.connect` starts this watcher in its own session with a pipe from the driver: while
the pipe is open it records the driver's descendants (pid and start time, so a reused pid is never
hit); when the pipe closes (the driver exited or was killed) it kills those still alive, with
their descendants, and exits.

Ours, not from a paper.
"""

from __future__ import annotations

import os
import select
import signal
import sys

import psutil


def _snapshot(roots: list[psutil.Process], seen: dict[int, float]) -> None:
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc.create_time()  # a reused pid: the newest holder is ours
        except psutil.Error:
            pass


def _reap(seen: dict[int, float]) -> None:
    victims: dict[int, psutil.Process] = {}
    for pid, started in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != started:
                continue  # the pid was reused by an unrelated process
            victims[pid] = proc
            for child in proc.children(recursive=True):
                victims[child.pid] = child
        except psutil.Error:
            continue
    victims.pop(os.getpid(), None)
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)


def main(root_pids: list[int], interval: float = 0.5) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    roots = []
    for pid in root_pids:
        try:
            roots.append(psutil.Process(pid))
        except psutil.Error:
            pass
    seen: dict[int, float] = {}
    while True:
        _snapshot(roots, seen)
        ready, _, _ = select.select([sys.stdin], [], [], interval)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver closed the pipe or died
    _reap(seen)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
