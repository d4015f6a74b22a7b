"""When requests reached the engine replicas, from the replicas' `request_finished` log lines.

    python bench/request_log.py serve.log [more.log ...]

Reads the structured line each replica logs per request (serve_app/replica.py; `serve run`'s console
output or Ray's replica log files) and, per burst of requests (a new burst starts after a gap of
`--gap-s` without arrivals), prints when they arrived (arrival = log time - total_time_s: when the
replica got the request), when they finished, and the engine-side throughput over that span. Served
throughput below the offline engine's shows here as arrivals spread over seconds: the HTTP path (proxy,
ingress) admitting a burst slower than the engine takes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Iterable

LINE = re.compile(r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*request_finished (?P<fields>\{.*\})\s*$")


def read_requests(lines: Iterable[str]) -> list[dict]:
    """One dict per request line: its logged fields plus `finish` and `arrival` (seconds since the epoch)."""
    requests = []
    for line in lines:
        match = LINE.search(line)
        if match is None:
            continue
        fields = json.loads(match["fields"])
        finish = datetime.datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        requests.append({**fields, "finish": finish, "arrival": finish - float(fields["total_time_s"])})
    return sorted(requests, key=lambda r: r["arrival"])


def bursts(requests: list[dict], gap_s: float) -> list[list[dict]]:
    groups: list[list[dict]] = []
    for request in requests:
        if not groups or request["arrival"] - groups[-1][-1]["arrival"] > gap_s:
            groups.append([])
        groups[-1].append(request)
    return groups


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def describe(burst: list[dict]) -> str:
    start = burst[0]["arrival"]
    offsets = [r["arrival"] - start for r in burst]
    last_finish = max(r["finish"] for r in burst) - start
    first_finish = min(r["finish"] for r in burst) - start
    output_tokens = sum(int(r.get("output_tokens", 0)) for r in burst)
    ttft = sorted(float(r["ttft_s"]) for r in burst if r.get("ttft_s") is not None)
    text = (
        f"{len(burst)} requests; arrivals over {offsets[-1]:.2f} s (p50 {percentile(offsets, 0.5):.2f}, "
        f"p90 {percentile(offsets, 0.9):.2f}; by 1 s {sum(o <= 1 for o in offsets)}, by 2 s "
        f"{sum(o <= 2 for o in offsets)}); finishes {first_finish:.2f}-{last_finish:.2f} s after the first "
        f"arrival; engine side {output_tokens / last_finish if last_finish > 0 else 0:.0f} output tok/s"
    )
    if ttft:
        text += f"; replica TTFT p50 {percentile(ttft, 0.5):.2f} s, p90 {percentile(ttft, 0.9):.2f} s"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--gap-s", type=float, default=5.0, help="a pause this long between arrivals ends a burst")
    args = parser.parse_args(argv)
    for path in args.logs:
        with open(path, errors="replace") as log:
            requests = read_requests(log)
        print(f"# {path}")
        if not requests:
            print("no request_finished lines")
        for burst in bursts(requests, args.gap_s):
            print(describe(burst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
