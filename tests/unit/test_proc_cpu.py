"""The serving benchmark's per-process CPU accounting."""

from __future__ import annotations

import os

import pytest

from benchmarks.proc_cpu import Reading, per_role, report, role, snapshot


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("ray::ServeReplica:rayrec-bench:ingress ", "ingress"),
        ("ray::ServeReplica:rayrec:ranker", "ranker"),
        ("ray::ServeController", "serve_controller"),
        ("/usr/bin/redis-server 127.0.0.1:6379", "redis"),
        ("/venv/lib/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "raylet"),
        ("/venv/lib/ray/core/src/ray/gcs/gcs_server --log_dir=x", "gcs"),
        ("ray::StreamProcessorActor.start", "stream_processors"),
        ("bash -c sleep 1", "other"),
    ],
)
def test_processes_are_grouped_by_role(cmdline: str, expected: str) -> None:
    assert role(cmdline, pid=10, own_pid=1) == expected


def test_the_measuring_process_is_the_load_generator() -> None:
    assert role("python -m benchmarks.serving", pid=7, own_pid=7) == "load_generator"


def test_cpu_per_request_sums_the_processes_of_a_role() -> None:
    before = Reading(0.0, {1: ("ingress", 1.0), 2: ("ingress", 2.0), 3: ("redis", 5.0)})
    after = Reading(
        2.0,
        {
            1: ("ingress", 1.5),
            2: ("ingress", 2.5),
            3: ("redis", 5.2),
            4: ("ranker", 0.3),  # started during the phase: counted from zero
            5: ("other", 0.0),
        },
    )
    assert per_role(before, after) == pytest.approx({"ingress": 1.0, "ranker": 0.3, "redis": 0.2})
    out = report(before, after, requests=100)
    per_request = {"ingress": 10.0, "ranker": 3.0, "redis": 2.0, "total": 15.0}
    assert out["ms_per_request"] == pytest.approx(per_request)
    assert out["cores"] == pytest.approx({"ingress": 0.5, "ranker": 0.15, "redis": 0.1, "total": 0.75})


def test_a_pid_reused_by_another_role_counts_from_zero() -> None:
    before = Reading(0.0, {9: ("ranker", 4.0)})
    after = Reading(1.0, {9: ("ingress", 0.5)})
    assert per_role(before, after) == pytest.approx({"ingress": 0.5})


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_snapshot_sees_this_process() -> None:
    reading = snapshot()
    assert reading.cpu_s[os.getpid()][0] == "load_generator"
    assert reading.cpu_s[os.getpid()][1] > 0
