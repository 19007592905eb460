"""CPU time of this machine's processes between two readings, grouped by role.

A latency figure alone does not say where a request's time went on a node whose cores are all
busy: a hop that waits for a core looks like a slow hop. Reading every process's CPU clock
(``/proc/<pid>/stat``) before and after a load phase and dividing by the requests it served gives
the CPU each role spends per request, which adds up to what the node has to find for it.

Processes are grouped by their command line: Ray names its workers after the actor they host
(``ray::ServeReplica:<app>:<deployment>``), so a replica's group is its deployment's name.
Linux only; elsewhere :func:`snapshot` is empty and so is every report.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_REPLICA: Final = re.compile(r"ServeReplica:[^:\s]+:([\w-]+)")

_ROLES: Final = (
    ("redis-server", "redis"),
    ("haproxy", "haproxy"),
    ("ServeController", "serve_controller"),
    ("ProxyActor", "serve_proxy"),
    ("gcs_server", "gcs"),
    ("raylet", "raylet"),
    ("dashboard", "dashboard"),
    ("DashboardAgent", "dashboard"),
    ("RuntimeEnvAgent", "dashboard"),
    ("log_monitor", "ray_monitors"),
    ("monitor.py", "ray_monitors"),
    ("StreamProcessorActor", "stream_processors"),
    ("LakeWriterActor", "lake_writer"),
)


@dataclass(frozen=True, slots=True)
class Reading:
    """CPU seconds per process at one instant.

    Attributes:
        at_s: ``time.monotonic()`` when read.
        cpu_s: pid to (role, user + system CPU seconds).
    """

    at_s: float
    cpu_s: dict[int, tuple[str, float]]


def role(cmdline: str, pid: int, own_pid: int) -> str:
    """The group a process counts in: a deployment name, a Ray or server role, or ``other``."""
    if pid == own_pid:
        return "load_generator"
    replica = _REPLICA.search(cmdline)
    if replica:
        return replica.group(1)
    for needle, name in _ROLES:
        if needle in cmdline:
            return name
    return "other"


def snapshot() -> Reading:
    """Every readable process's CPU clock now (processes that end meanwhile are skipped)."""
    import time

    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    own = os.getpid()
    out: dict[int, tuple[str, float]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return Reading(time.monotonic(), out)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The command name in field 2 may hold spaces and parentheses; the rest follows the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])
        out[pid] = (role(cmdline, pid, own), (utime + stime) / tick)
    return Reading(time.monotonic(), out)


def per_role(before: Reading, after: Reading) -> dict[str, float]:
    """CPU seconds each role used between two readings, largest first.

    A process that started in between counts from zero; one that ended is left out (its last
    interval is lost, which only matters for processes that come and go during a phase).
    """
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.cpu_s.items():
        start = before.cpu_s.get(pid)
        delta = cpu - (start[1] if start is not None and start[0] == name else 0.0)
        if delta > 0:
            used[name] = used.get(name, 0.0) + delta
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


def report(
    before: Reading,
    after: Reading,
    requests: int,
    *,
    per: str = "ms_per_request",
    scale: float = 1000.0,
    digits: int = 2,
) -> dict[str, object]:
    """Cores busy per role over the interval and CPU time per request.

    Args:
        before: Reading at the phase's start.
        after: Reading at its end.
        requests: Requests (or other units of work) the phase served.
        per: Name of the per-request map.
        scale: Its unit per second of CPU (1,000: milliseconds; 1,000,000: microseconds).
        digits: Decimals it keeps.

    Returns:
        ``cores`` (role to average cores busy, plus ``total``) and ``per`` (role to CPU time per
        request, plus ``total``); empty maps when nothing could be read.
    """
    wall = after.at_s - before.at_s
    used = per_role(before, after)
    total = sum(used.values())
    cores = {k: round(v / wall, 3) for k, v in used.items()} if wall > 0 else {}
    per_request = {k: round(v * scale / requests, digits) for k, v in used.items()} if requests else {}
    if used:
        cores["total"] = round(total / wall, 3) if wall > 0 else 0.0
        if requests:
            per_request["total"] = round(total * scale / requests, digits)
    return {"cores": cores, per: per_request}
