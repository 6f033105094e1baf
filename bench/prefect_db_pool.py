"""The Prefect server's SQLite files under load: their number follows the peak of concurrent
requests (the connection pool, and the descriptors SQLite keeps for reuse), not the number of runs.

    python bench/prefect_db_pool.py [--bursts 6] [--concurrency 60]

Starts a Prefect server as `rlhf server` does (loopback, temporary PREFECT_HOME), then sends bursts
of concurrent requests (create a flow run, list flow runs, set its state) and counts the server's
open files after each burst, by kind (bench/soak.py's `open_files`). bench/soak.py judges the
server's open files less these database files; this shows why. Prints a table, or JSON with --json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="rlhf-pool-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.soak import open_files  # noqa: E402
from flows.serve import free_port  # noqa: E402
from flows.serve import start_servers  # noqa: E402
from tasks.workspace import init_workspace  # noqa: E402


async def burst(api_url: str, n: int) -> int:
    """n concurrent create/list/set-state request chains; returns how many the server refused (503)."""
    from prefect import flow
    from prefect.client.orchestration import PrefectClient
    from prefect.states import Running

    @flow(name="pool-probe")
    def probe() -> None:
        pass

    async with PrefectClient(api=api_url) as client:
        async def one(i: int) -> None:
            run = await client.create_flow_run(probe, name=f"probe-{i}")
            await client.read_flow_runs(limit=50)
            await client.set_flow_run_state(run.id, Running())
        results = await asyncio.gather(*[one(i) for i in range(n)], return_exceptions=True)
    return sum(1 for r in results if isinstance(r, Exception))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bursts", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=60)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.bursts < 1 or a.concurrency < 1:
        raise SystemExit("--bursts and --concurrency must be at least 1")
    ws = init_workspace(Path(tempfile.mkdtemp(prefix="rlhf-pool-")) / "ws")
    servers = start_servers(ws, prefect_port=free_port(), mlflow_port=None)
    server = psutil.Process(servers.prefect.pid)
    rows = []
    try:
        rows.append({"after": "start", "refused": 0, **open_files(server)})
        for k in range(a.bursts):
            refused = asyncio.run(burst(servers.prefect_url, a.concurrency))
            time.sleep(2)
            rows.append({"after": f"burst {k + 1}", "refused": refused, **open_files(server)})
            print(rows[-1], file=sys.stderr, flush=True)
        time.sleep(30)
        rows.append({"after": "30 s idle", "refused": 0, **open_files(server)})
    finally:
        servers.stop()
    if a.json:
        print(json.dumps({"benchmark": "prefect_db_pool", "concurrency": a.concurrency, "rows": rows}))
    else:
        cols = ["after", "total", "database", "sockets", "other", "refused"]
        print(" | ".join(cols))
        print(" | ".join("---" for _ in cols))
        for r in rows:
            print(" | ".join(str(r[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
