"""Cores for ranks that spin, claimed machine-wide.

Ranks that talk through shared memory (`sharding.shm`) spin while they wait, so each is pinned to
cores of its own. Counting cores from zero per server is not enough: two servers on one machine
(or a server rebuilt beside a dying one) would put their spinning ranks on the same cores. So a
rank *claims* its cores: a claim is a file ``<directory>/core-<n>`` created with O_EXCL, holding
the claimant's pid and start time. A claim whose process is gone, or whose pid now names another
process, is stale and may be taken over. A process's claims are released when it exits normally;
a killed process leaves them stale, and the next claimant takes them over.

    cores = claim_cores(2, preferred=[4, 5, 6, 7, 0, 1, 2, 3])   # e.g. [4, 5], or None
"""

from __future__ import annotations

import atexit
import os
import time

from sharding.shm import proc_start_time

CLAIMS_DIR = "/dev/shm/tpserve-cores"
_mine: set[str] = set()  # this process's claim files, released at exit


def claim_cores(count: int, preferred: list[int], directory: str = CLAIMS_DIR) -> list[int] | None:
    """Claims `count` cores, trying them in `preferred` order; None (and nothing claimed) when
    fewer than `count` of them are free."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None
    got = []
    for core in preferred:
        if len(got) == count:
            break
        if _claim(os.path.join(directory, f"core-{core}")):
            got.append(core)
    if len(got) < count:
        release(got, directory)
        return None
    return got


def release(cores: list[int], directory: str = CLAIMS_DIR) -> None:
    for core in cores:
        path = os.path.join(directory, f"core-{core}")
        if path in _mine:
            _mine.discard(path)
            _unlink(path)


def _claim(path: str) -> bool:
    me = f"{os.getpid()} {proc_start_time(os.getpid())}"
    for _ in range(2):  # a second try after removing a stale claim
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            claim = _read(path)
            if claim is not None and claim[0] == os.getpid():
                return False  # this process holds it already
            if claim is not None and _alive(*claim):
                return False
            if claim is None and not _abandoned(path):
                return False  # being written this instant
            _unlink(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        _mine.add(path)
        return True
    return False


def _read(path: str) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            pid, start = f.read().split()
        return int(pid), int(start)
    except (OSError, ValueError):
        return None


def _alive(pid: int, start: int) -> bool:
    return proc_start_time(pid) == start


def _abandoned(path: str) -> bool:
    """An unreadable claim older than a few seconds: its writer died between create and write."""
    try:
        return time.time() - os.stat(path).st_mtime > 5.0
    except FileNotFoundError:
        return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@atexit.register
def _release_all() -> None:
    for path in list(_mine):
        _unlink(path)
    _mine.clear()
