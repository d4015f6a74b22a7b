"""bench/request_log.py's reading of the replicas' `request_finished` lines (as `serve run` prints them)."""

from __future__ import annotations

import json

import pytest
from bench_scripts import bench_script

PREFIX = "\x1b[36m(ServeReplica:pagedserve:EngineReplica pid=1764)\x1b[0m INFO 2026-11-29 14:35:{sec}"


@pytest.fixture(scope="module")
def request_log():
    yield from bench_script("request_log")


def line(finish_s: float, total_s: float, output_tokens: int = 10) -> str:
    fields = {"event": "request_finished", "request_id": "r", "output_tokens": output_tokens, "ttft_s": 0.5,
              "total_time_s": total_s}
    return (PREFIX.format(sec=f"{finish_s:06.3f}".replace(".", ",")) + " pagedserve_EngineReplica gop4kvwk 1f2b -- request_finished "
            + json.dumps(fields, separators=(",", ":")) + "\n")


def test_arrivals_bursts_and_throughput(request_log) -> None:
    lines = [
        "INFO 2026-11-29 14:34:15,046 serve 953 -- Started Serve in namespace \"serve\".\n",
        line(12.0, 10.0), line(13.0, 10.5), line(14.0, 10.0),  # burst 1: arrivals at 2.0, 2.5, 4.0 s
        line(40.0, 5.0),  # burst 2: arrival at 35.0 s, over 5 s after the last one
    ]
    requests = request_log.read_requests(lines)
    assert [round(r["arrival"] % 60, 3) for r in requests] == [2.0, 2.5, 4.0, 35.0]
    first, second = request_log.bursts(requests, gap_s=5.0)
    assert len(first) == 3 and len(second) == 1
    text = request_log.describe(first)
    assert text.startswith("3 requests; arrivals over 2.00 s")
    assert "by 1 s 2" in text and "finishes 10.00-12.00 s" in text
    assert "engine side 2 output tok/s" in text  # 30 tokens over the 12 s from first arrival to last finish
