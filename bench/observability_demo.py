"""Run the service, a real Prometheus and a load; render the Grafana dashboard's panels from Prometheus.

    python bench/observability_demo.py --out docs/observability-dashboard.png

Starts a local Ray cluster whose metrics agent listens on an OS-picked port, serves the demo model (or
`--model`) on `--replicas` replicas with a deliberately small KV cache (`--num-blocks`) so the load
fills it, starts `prometheus` (Debian package `prometheus`, or any binary on PATH) scraping the agent
every second with k8s/prometheus/pagedserve-rules.yaml, and sends streaming completions in three phases
(light, heavy, light). Then it evaluates every query of k8s/grafana/pagedserve-dashboard.json over the
run with Prometheus' range API (template variables set to "all", `$__rate_interval` to 15s) and draws the
panels, with their warning thresholds, into one PNG: what Grafana would show for the same queries, for
hosts without a Grafana server. It also prints the alerts Prometheus had firing or pending at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "k8s" / "grafana" / "pagedserve-dashboard.json"
RULES = REPO_ROOT / "k8s" / "prometheus" / "pagedserve-rules.yaml"
SYSTEM_PREFIX = "You are a helpful assistant. Answer briefly and precisely, and say when you do not know. "
WORDS = "the scheduler packs decodes and prompt chunks of many requests into one batch of paged blocks".split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_prometheus(workdir: Path, metrics_port: int, web_port: int) -> subprocess.Popen:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("no prometheus binary on PATH (apt-get install prometheus)")
    shutil.copy(RULES, workdir / "pagedserve-rules.yaml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["pagedserve-rules.yaml"],
        "scrape_configs": [{"job_name": "pagedserve", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"),
    )


async def load(base: str, model: str, phases: list[tuple[float, int]], max_tokens: int, seed: int) -> int:
    """Streaming completions at a fixed concurrency per phase: [(seconds, concurrency), ...]."""
    rng = random.Random(seed)
    done = 0
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def one() -> None:
            nonlocal done
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
            if rng.random() < 0.5:  # half share a system prefix: prefix cache hits
                prompt = SYSTEM_PREFIX + prompt
            body = {"model": model, "prompt": prompt, "max_tokens": rng.randint(max_tokens // 4, max_tokens),
                    "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    pass
            done += 1

        for duration_s, concurrency in phases:
            stop_at = time.monotonic() + duration_s

            async def worker(stop_at: float = stop_at) -> None:
                while time.monotonic() < stop_at:
                    try:
                        await one()
                    except httpx.HTTPError:
                        await asyncio.sleep(0.2)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def panel_queries(panel: dict, step_s: int) -> list[tuple[str, str]]:
    out = []
    for target in panel.get("targets", []):
        expr = (target["expr"].replace("$__rate_interval", f"{max(15, 4 * step_s)}s")
                .replace("$model", ".*").replace("$replica", ".*"))
        out.append((expr, target.get("legendFormat", "")))
    return out


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = fmt
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value[:12])
    return text or json.dumps(labels)


def render(prom_url: str, start: float, end: float, out: Path, step_s: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] == "timeseries"]
    columns = 3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.1 * rows), squeeze=False)
    fig.suptitle(f"{dashboard['title']} dashboard (panels rendered from Prometheus query_range)", fontsize=14)
    for ax, panel in zip(axes.flat, panels):
        defaults = panel["fieldConfig"]["defaults"]
        for expr, fmt in panel_queries(panel, step_s):
            result = httpx.get(f"{prom_url}/api/v1/query_range", timeout=30,
                               params={"query": expr, "start": start, "end": end, "step": step_s}).json()
            if result.get("status") != "success":
                ax.text(0.5, 0.5, result.get("error", "query failed")[:60], transform=ax.transAxes, ha="center")
                continue
            for series in result["data"]["result"]:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, linewidth=1.5, label=legend(fmt, series["metric"]))
        _, high = ax.get_ylim()
        for step in defaults.get("thresholds", {}).get("steps", [])[1:]:
            if step["value"] <= max(high, defaults.get("max", high)) * 1.5:
                ax.axhline(step["value"], color="orange", linestyle="--", linewidth=1,
                           label=f"warn > {step['value']:g}")
            else:  # far above the data: say so instead of flattening the curves
                ax.text(0.99, 0.95, f"warn > {step['value']:g} (off scale)", transform=ax.transAxes,
                        ha="right", va="top", fontsize=7, color="darkorange")
        unit = defaults.get("unit", "")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("s since start", fontsize=8)
        ax.set_ylabel({"percentunit": "fraction", "s": "seconds", "bytes": "bytes", "reqps": "req/s"}.get(unit, ""),
                      fontsize=8)
        ax.tick_params(labelsize=7)
        if "min" in defaults and "max" in defaults:
            ax.set_ylim(defaults["min"], defaults["max"] * 1.05)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=6, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the built-in demo model")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-blocks", type=int, default=40, help="KV blocks per replica (small: it fills)")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--phase-s", type=float, default=40.0, help="length of each of the three load phases")
    parser.add_argument("--light", type=int, default=2, help="concurrency of the light phases")
    parser.add_argument("--heavy", type=int, default=24, help="concurrency of the heavy phase")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "observability-dashboard.png")
    args = parser.parse_args()

    import ray
    from ray import serve

    from pagedserve.serve_app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    metrics_port, http_port, prom_port = free_port(), free_port(), free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}})
    workdir = Path(tempfile.mkdtemp(prefix="pagedserve-prom-"))
    prometheus = start_prometheus(workdir, metrics_port, prom_port)
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve_args = {"num_replicas": args.replicas, "num_blocks": args.num_blocks, "block_size": 16,
                      "num_cpus_per_replica": 1, "router": {"stats_period_s": 0.5, "max_queued_requests": 256}}
        if args.model:
            serve_args["model"] = args.model
        serve.run(build_app(serve_args), name="demo", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        start = time.time()
        phases = [(args.phase_s, args.light), (args.phase_s, args.heavy), (args.phase_s, args.light)]
        num_done = asyncio.run(load(base, model, phases, args.max_tokens, seed=0))
        time.sleep(8)  # let the last reports reach Prometheus
        end = time.time()
        print(f"{num_done} requests in {end - start:.0f} s; Prometheus data in {workdir}")
        alerts = httpx.get(f"{prom_url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        for alert in alerts:
            print(f"alert {alert['labels']['alertname']}: {alert['state']} {alert['labels'].get('replica', '')}")
        render(prom_url, start, end, args.out)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=10)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
