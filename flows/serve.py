"""`rlhf server` and `rlhf serve`: the Prefect and MLflow servers, and the deployments served on them.

`rlhf server` starts Prefect's API and UI and MLflow's tracking server and UI, on loopback by
default. `rlhf serve` registers three deployments and runs their flow runs in this process's
children until stopped:

- `rlhf-refinement/scheduled`: one refinement round on the cron of params.yaml, at most one at a
  time (Prefect's deployment concurrency limit cancels an overlapping run; the round lock backs
  it up for rounds started any other way);
- `rlhf-round/on-demand`: one round of the loop, when triggered;
- `rlhf-label/on-demand`: the labelling flow, when triggered.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.processes import stop_groups
from tasks.workspace import Workspace, tracking_server

LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """A server cannot be started as asked; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, mlflow_auth: bool, environ: dict | None = None) -> None:
    """Beyond loopback, both servers must ask for credentials: refuse otherwise, saying how."""
    if is_loopback(host):
        return
    environ = os.environ if environ is None else environ
    missing = []
    if not environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        missing.append("set PREFECT_SERVER_API_AUTH_STRING=user:password (Prefect's basic auth; clients set "
                       "PREFECT_API_AUTH_STRING to the same)")
    if not mlflow_auth:
        missing.append("pass --mlflow-auth (MLflow's basic-auth app; set MLFLOW_FLASK_SERVER_SECRET_KEY and "
                       "change the admin password at once, see the README)")
    if missing:
        raise ServerError(f"refusing to bind to {host}: anyone who can reach it could run flows and read "
                          "models. " + "; ".join(missing) + ". Or keep the default host 127.0.0.1.")


@dataclass
class Servers:
    prefect: subprocess.Popen
    mlflow: subprocess.Popen | None
    prefect_url: str
    mlflow_url: str | None

    def stop(self) -> None:
        stop_groups(self.prefect, self.mlflow, timeout=20)


def spawn_serve(workspace: Path, prefect_url: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`rlhf serve` for `workspace` against `prefect_url`, in its own process group (tests, soak)."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--workspace", str(workspace)],
                            env={**os.environ, **(env or {}), "PREFECT_API_URL": prefect_url},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now (tests, soak: servers side by side)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name  # the venv's own, also when PATH lacks it
    return str(here) if here.exists() else (shutil.which(name) or name)


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with code {proc.returncode} while starting; its log: {log}\n"
                              + log.read_text(errors="replace")[-2000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServerError(f"{what} did not answer at {url} within {timeout:.0f} s; its log: {log}")


def start_servers(ws: Workspace, host: str = LOOPBACK, prefect_port: int = 4200, mlflow_port: int | None = 5000,
                  mlflow_auth: bool = False, timeout: float = 180) -> Servers:
    """Prefect's server (API + UI) and MLflow's (tracking + UI on the workspace's store). With
    MLFLOW_TRACKING_URI at a tracking server of your own, that server is MLflow's: none is started."""
    check_exposure(host, mlflow_auth)
    logs = ws.root / ".cache" / "servers"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # the UI runs in the browser and calls the API itself: tell it where (Prefect's default is port 4200
    # whatever --port says). Beyond loopback, set PREFECT_UI_API_URL to the address browsers reach.
    env.setdefault("PREFECT_UI_API_URL", f"http://{host}:{prefect_port}/api")
    prefect_log = logs / "prefect.log"
    prefect = subprocess.Popen([_bin("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
                               stdout=open(prefect_log, "ab"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    mlflow = mlflow_url = None
    if tracking_server(ws.tracking_uri):
        mlflow_url, mlflow_port = ws.tracking_uri, None
    try:
        if mlflow_port is not None:
            mlflow_log = logs / "mlflow.log"
            ws.mlruns.mkdir(parents=True, exist_ok=True)
            cmd = [_bin("mlflow"), "server", "--host", host, "--port", str(mlflow_port),
                   "--backend-store-uri", ws.tracking_uri, "--default-artifact-root", ws.mlruns.as_uri(),
                   "--workers", "1"]
            if mlflow_auth:
                cmd += ["--app-name", "basic-auth"]
            mlflow = subprocess.Popen(cmd, stdout=open(mlflow_log, "ab"), stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True, cwd=ws.root)
            mlflow_url = f"http://{host}:{mlflow_port}"
            wait_http(f"{mlflow_url}/health", mlflow, timeout, "the MLflow server", mlflow_log)
        prefect_url = f"http://{host}:{prefect_port}/api"
        wait_http(f"{prefect_url}/health", prefect, timeout, "the Prefect server", prefect_log)
    except BaseException:
        Servers(prefect, mlflow, "", None).stop()
        raise
    return Servers(prefect, mlflow, prefect_url, mlflow_url)


def configured_api_url() -> str | None:
    """The Prefect server this process's flows report to, as Prefect reads it: PREFECT_API_URL from
    the environment or from the active profile (`prefect config set PREFECT_API_URL=...`); None when
    neither names one."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@contextlib.contextmanager
def prefect_api(ws: Workspace, timeout: float = 120, ui: bool = False) -> Iterator[str]:
    """The Prefect API this process's flows report to: PREFECT_API_URL's, or else a temporary
    server, stopped on the way out. Prefect would start one itself, but in this process's group,
    where Ctrl-C stops it with the flow: the flow then retries for minutes to report itself to a
    server that is gone. In a group of its own the server outlives Ctrl-C, the flow run is
    recorded as crashed and the command ends in a second or two. `ui`: the temporary server
    serves Prefect's UI too (the label flow's form), at the API's address less `/api`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if configured_api_url():
        yield configured_api_url()
        return
    logs = ws.root / ".cache" / "servers"
    logs.mkdir(parents=True, exist_ok=True)
    log, port = logs / "prefect-temporary.log", free_port()
    url = f"http://{LOOPBACK}:{port}/api"
    # the API and the services that record flow and task runs, as Prefect's temporary server has
    # them; no scheduler (nothing here is scheduled); the UI only where a person is to use it,
    # told where its API is (the browser calls it; Prefect's default is port 4200)
    proc = subprocess.Popen([_bin("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port),
                             *([] if ui else ["--no-ui"]), "--no-scheduler", "--no-late-runs"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": url})
    try:
        wait_http(f"{url}/health", proc, timeout, "the temporary Prefect server", log)
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:  # the runs' last logs and events are still on their way: sent before the server stops
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=5)
                EventsWorker.drain_all(timeout=5)
    finally:
        stop_groups(proc, timeout=20)


def deployments(workspace: str, cfg: PipelineConfig) -> list:
    """The three deployments `rlhf serve` runs (see the module's docstring)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from flows.labelling import label
    from flows.pipeline import rlhf_round
    from flows.refinement import rlhf_refinement

    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return [
        rlhf_refinement.to_deployment(
            name="scheduled", schedules=[Cron(cfg.refinement.cron, timezone=cfg.refinement.timezone)],
            concurrency_limit=one_at_a_time, parameters={"workspace": workspace}, tags=["rlhf", "scheduled"],
            description="One refinement round: feedback on the champion, validation, reward model, PPO, "
                        "evaluation, gated promotion. Overlapping runs are cancelled."),
        rlhf_round.to_deployment(name="on-demand", concurrency_limit=one_at_a_time,
                                 parameters={"workspace": workspace}, tags=["rlhf"],
                                 description="One round of the loop, started by hand."),
        label.to_deployment(name="on-demand", parameters={"workspace": workspace}, tags=["rlhf", "labelling"],
                            description="Label response pairs of the champion in a form, batch by batch."),
    ]


def serve(workspace: str, cfg: PipelineConfig) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(workspace, cfg), print_starting_message=True)
