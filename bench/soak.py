"""Soak: N consecutive scheduled refinement rounds of the built-in tiny scenario, unattended.

    python bench/soak.py --rounds 20

What a user runs for weeks, in under an hour: a Prefect server (as `rlhf server` starts it, on
loopback, with a temporary PREFECT_HOME), and `rlhf serve` with the refinement deployment on a
cron of every minute, in a new workspace with the default params.yaml. Nothing triggers a run by
hand. The benchmark watches and checks:

- no failure: every scheduled run completes, or is cancelled by the concurrency limit because a
  round was still running (an overlap), never FAILED or CRASHED;
- no growth per round in the resident memory or the open files of the long-lived processes
  (`rlhf serve` and the Prefect server), sampled after each round (open files: the fewest seen
  over 10 s, so that a request in flight does not count; a leak stays and counts). The Prefect
  server's SQLite files are reported apart and not judged: their number follows the peak of
  concurrent requests the server has served (its connection pool, and the descriptors SQLite
  keeps for reuse), not the number of rounds; bench/prefect_db_pool.py shows it. The
  peak memory of the round's process tree is reported beside them;
- the gold metric (the champion's neutral-pronoun rate on held-out prompts, as the round's
  evaluation measured it) never below its first-round value, less two standard errors of the
  measurement (it is a rate over a finite sample).

Prints a table, or one JSON object with --json; writes bench/results/soak.json; exits 1 when a
check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="rlhf-soak-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from flows.serve import free_port, spawn_serve, start_servers  # noqa: E402
from tasks import rounds, scenario  # noqa: E402
from tasks.config import ConfigError, load_config  # noqa: E402
from tasks.processes import stop_groups  # noqa: E402
from tasks.workspace import init_workspace  # noqa: E402

DEPLOYMENT = "rlhf-refinement/scheduled"
MIB = 2**20


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


DATABASE_FILE = re.compile(r"\.db(-wal|-shm|-journal)?$")


def open_files(proc: psutil.Process) -> dict:
    """A process's open file descriptors by kind: `database` (SQLite files: Prefect's connection pool,
    which follows the peak load), `sockets`, `other`; and their `total`."""
    total = proc.num_fds()
    database = sum(1 for f in proc.open_files() if DATABASE_FILE.search(f.path))
    sockets = len(proc.net_connections(kind="all"))
    return {"total": total, "database": database, "sockets": sockets, "other": total - database - sockets}


def settled_open_files(proc: psutil.Process, window: float = 10.0, every: float = 0.5) -> dict:
    """The fewest open files seen over `window` seconds: a request in flight holds a socket for a moment;
    a leaked descriptor stays, so it shows in the minimum too."""
    samples = []
    for _ in range(max(1, int(window / every))):
        samples.append(open_files(proc))
        time.sleep(every)
    return min(samples, key=lambda k: k["total"])


class PeakSampler(threading.Thread):
    """Peak RSS of a process tree, sampled every `every` seconds; `take()` returns it and resets."""

    def __init__(self, proc: psutil.Process, every: float = 0.5):
        super().__init__(daemon=True)
        self.proc, self.every, self.peak, self.stop = proc, every, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, rss(tree(self.proc)))

    def take(self) -> int:
        peak, self.peak = self.peak, 0
        return peak


def finished_runs(api_url: str, deployment_id) -> list:
    """The deployment's flow runs in a final state (the API pages by at most 200)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    final = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
    deployments = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    runs = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=final)))

    async def go():
        out = []
        async with PrefectClient(api=api_url) as client:
            while True:
                page = await client.read_flow_runs(deployment_filter=deployments, flow_run_filter=runs,
                                                   limit=200, offset=len(out))
                out += page
                if len(page) < 200:
                    return out
    return asyncio.run(go())


def deployment_id(api_url: str):
    from prefect.client.orchestration import PrefectClient

    async def go():
        async with PrefectClient(api=api_url) as client:
            return (await client.read_deployment_by_name(DEPLOYMENT)).id
    try:
        return asyncio.run(go())
    except Exception:
        return None


def folder_mib(path: Path) -> float:
    """Bytes of the files under `path`, in MiB (links not followed: DVC may link its cache)."""
    if not path.exists():
        return 0.0
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / MIB


DISK = {"dvc_cache_mib": ".dvc/cache", "dvc_remote_mib": ".dvcstore", "mlruns_mib": "mlruns"}


def slope(ys: list[float]) -> float:
    """Least-squares slope per round."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def champion_gold(line: dict) -> float:
    return line["gold_after"] if line["promoted"] else line["gold_before"]


def soak(n_rounds: int, workspace: Path, overrides: dict, timeout_s: float, log) -> dict:
    ws = init_workspace(workspace)
    cfg = load_config(None, {**overrides, "refinement.cron": "* * * * *"})
    rounds.write_params(ws, cfg)
    samples_per_gold = cfg.evaluate.samples_for(len(scenario.heldout_prompts())) * len(scenario.heldout_prompts())
    servers = start_servers(ws, prefect_port=free_port(), mlflow_port=None)
    serve_log = ws.root / ".cache" / "serve.log"
    serve = spawn_serve(ws.root, servers.prefect_url, serve_log)
    serve_proc, server_proc = psutil.Process(serve.pid), psutil.Process(servers.prefect.pid)
    sampler = PeakSampler(serve_proc)
    sampler.start()
    per_round, failures, cancelled, started = [], [], 0, time.monotonic()
    try:
        dep = None
        while dep is None:
            if serve.poll() is not None:
                raise RuntimeError(f"rlhf serve exited ({serve.returncode}): see {serve_log}")
            dep = deployment_id(servers.prefect_url)
            time.sleep(1)
        seen_final: set = set()
        while len(per_round) < n_rounds:
            if time.monotonic() - started > timeout_s:
                failures.append(f"timed out after {timeout_s:.0f} s with {len(per_round)} rounds")
                break
            if serve.poll() is not None:
                failures.append(f"rlhf serve exited ({serve.returncode}); see {serve_log}")
                break
            for run in finished_runs(servers.prefect_url, dep):
                if run.id in seen_final:
                    continue
                seen_final.add(run.id)
                kind = run.state.type.value
                if kind in ("FAILED", "CRASHED"):
                    failures.append(f"{run.name}: {kind}: {run.state.message}")
                    log(f"run {run.name} {kind}: {run.state.message}")
            done = rounds.completed_rounds(ws)
            if len(done) > len(per_round):
                time.sleep(3)  # let the finished flow run's process exit before sampling
                line = done[len(per_round)]
                serve_files, server_files = settled_open_files(serve_proc), settled_open_files(server_proc)
                row = {
                    "round": line["round"],
                    "elapsed_s": round(time.monotonic() - started, 1),
                    "serve_rss_mib": round(rss([serve_proc]) / MIB, 1),
                    "serve_open_files": serve_files["total"],
                    "serve_sockets": serve_files["sockets"],
                    "server_rss_mib": round(rss(tree(server_proc)) / MIB, 1),
                    "server_open_files": server_files["total"],
                    "server_database_files": server_files["database"],
                    "server_sockets": server_files["sockets"],
                    "round_peak_rss_mib": round(sampler.take() / MIB, 1),
                    "gold_champion": round(champion_gold(line), 4),
                    "gold_candidate": round(line["gold_after"], 4),
                    "promoted": line["promoted"],
                    "kl": round(line["kl"], 3),
                    **{key: round(folder_mib(ws.root / folder), 2) for key, folder in DISK.items()},
                }
                per_round.append(row)
                log(" ".join(f"{k}={v}" for k, v in row.items()))
                if len(failures) >= 3:
                    break
            time.sleep(2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report the rounds so far
        failures.append(f"interrupted after {len(per_round)} rounds")
    try:
        cancelled = sum(1 for r in finished_runs(servers.prefect_url, dep) if r.state.type.value == "CANCELLED")
    except Exception as e:  # the server is going away with us: the count is only a figure
        log(f"could not count cancelled runs: {e}")
    finally:
        sampler.stop.set()
        stop_groups(serve)
        servers.stop()
    return {"rounds": per_round, "failures": failures, "cancelled_overlaps": cancelled,
            "gold_samples": samples_per_gold, "wall_s": round(time.monotonic() - started, 1)}


def judge(result: dict, n_rounds: int) -> dict:
    """The checks, each with its figures. Growth is measured after a warm-up of two rounds."""
    rows = result["rounds"]
    steady = rows[2:] if len(rows) > 4 else rows
    checks = {"rounds_completed": {"value": len(rows), "want": n_rounds, "ok": len(rows) == n_rounds},
              "failures": {"value": len(result["failures"]), "want": 0, "ok": not result["failures"]}}
    for key, limit in (("serve_rss_mib", 1.0), ("server_rss_mib", 2.0)):
        s = slope([r[key] for r in steady])
        checks[f"{key}_per_round"] = {"value": round(s, 3), "want": f"< {limit}", "ok": s < limit}
    # open files: serve's all, the Prefect server's less its SQLite files (their number follows the peak
    # of concurrent requests, not the rounds: see bench/prefect_db_pool.py); those are reported beside
    series = {"serve_open_files": [r["serve_open_files"] for r in steady],
              "server_open_files_but_database": [r["server_open_files"] - r["server_database_files"] for r in steady]}
    for key, ys in series.items():
        s = slope(ys)
        checks[f"{key}_per_round"] = {"value": round(s, 3), "want": "< 0.1", "ok": s < 0.1}
    if rows:
        g0 = rows[0]["gold_champion"]
        se = math.sqrt(max(g0 * (1 - g0), 1e-4) / result["gold_samples"])
        low = min(r["gold_champion"] for r in rows)
        checks["gold_min_vs_first"] = {"value": round(low - g0, 4), "want": f">= -2 SE = {-2 * se:.4f}",
                                       "ok": low >= g0 - 2 * se}
        checks["gold_last_vs_first"] = {"value": round(rows[-1]["gold_champion"] - g0, 4), "want": ">= 0",
                                        "ok": rows[-1]["gold_champion"] >= g0}
    checks["passed"] = all(c["ok"] for c in checks.values())
    return checks


def disk_growth(result: dict) -> dict:
    """MiB a round in each store: reported, not judged (every round keeps its models by design;
    README, "Disk", says how to prune DVC's copies)."""
    rows = result["rounds"]
    return {key: round(slope([r[key] for r in rows]), 3) for key in DISK} if len(rows) > 1 else {}


def table(result: dict, checks: dict) -> str:
    cols = ["round", "elapsed_s", "serve_rss_mib", "serve_open_files", "server_rss_mib", "server_open_files",
            "server_database_files", "round_peak_rss_mib", "gold_champion", "gold_candidate", "promoted", "kl"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in result["rounds"]]
    lines.append("")
    lines += [f"{name}: {c['value']} (want {c['want']}) {'ok' if c['ok'] else 'FAILED'}"
              for name, c in checks.items() if name != "passed"]
    growth = disk_growth(result)
    if growth:
        lines.append("disk a round (reported, not judged): " + ", ".join(f"{k} {v}" for k, v in growth.items()))
    lines.append(f"cancelled overlapping scheduled runs: {result['cancelled_overlaps']}; "
                 f"wall time {result['wall_s'] / 60:.1f} min; " + ("PASSED" if checks["passed"] else "FAILED"))
    lines += [f"failure: {f}" for f in result["failures"]]
    return "\n".join(lines)


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--workspace", type=Path, help="new folder for the run (default: a temporary one, removed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a params.yaml override, as `rlhf run --set` (default: none, the built-in scenario)")
    p.add_argument("--timeout-min", type=float, default=180)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.rounds < 3:
        raise SystemExit("--rounds must be at least 3 (growth is measured after two warm-up rounds)")
    if a.workspace is not None and a.workspace.exists() and any(a.workspace.iterdir()):
        raise SystemExit(f"--workspace {a.workspace} is not empty")
    overrides = parse_set(a.set)
    try:
        load_config(None, overrides)  # a bad override stops here, with the key named
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    workspace = a.workspace or Path(tempfile.mkdtemp(prefix="rlhf-soak-")) / "ws"
    log = (lambda msg: None) if a.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly, keeping the figures
    result = soak(a.rounds, workspace, overrides, a.timeout_min * 60, log)
    checks = judge(result, a.rounds)
    out = {"benchmark": "soak", "rounds_asked": a.rounds, "overrides": overrides, "workspace": str(workspace),
           **result, "disk_per_round_mib": disk_growth(result), "checks": checks, "passed": checks["passed"]}
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "soak.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out) if a.json else table(result, checks))
    if a.workspace is None and checks["passed"]:
        shutil.rmtree(workspace.parent, ignore_errors=True)
    return 0 if checks["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
