"""With MLFLOW_TRACKING_URI pointing at a tracking server (a real `mlflow server` started here, its
artifacts proxied as teams run it), the registered models live in the server's artifact store,
not in a folder of the machine that ran the first round, and `rlhf gc` prunes them there."""
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from flows.serve import free_port, start_servers, wait_http
from tasks import gc, promote, tracking, workspace
from tasks.config import load_config
from tasks.errors import ModelLoadError
from tasks.processes import stop_groups
from tasks.workspace import folder_bytes, init_workspace


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module (its start, a new database's migrations included, takes about 9 s)."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    store = tmp_path / "server-artifacts"
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(store)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, 120, "the MLflow server", log)
        yield url, store
    finally:
        stop_groups(proc)


def test_models_live_in_the_servers_store_and_gc_prunes_them_there(tmp_path, tiny_model_dir, monkeypatch,
                                                                    mlflow_server):
    url, store = mlflow_server
    monkeypatch.setattr(workspace, "USER_TRACKING_URI", url)  # as a user's MLFLOW_TRACKING_URI is read
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    ws = init_workspace(tmp_path / "ws")
    cfg = load_config(None)
    client = tracking.setup(ws, cfg.project)
    assert ws.tracking_uri == url
    assert client.get_experiment_by_name(cfg.project).artifact_location.startswith("mlflow-artifacts:")
    with mlflow.start_run(run_name="three-versions"):
        versions = [tracking.log_model(tiny_model_dir, "policy", cfg.policy_name).version for _ in range(3)]
    client.set_registered_model_alias(cfg.policy_name, tracking.CHAMPION, versions[0])
    assert folder_bytes(ws.mlruns) == 0  # nothing in a folder only this machine reaches
    assert "MLflow on its server" in gc.describe_usage(gc.disk_usage(ws))
    stored = folder_bytes(store)
    assert stored > 3 * folder_bytes(tiny_model_dir)

    plan = gc.collect_garbage(ws, cfg, keep=1, dry_run=True)
    [pruned] = plan["models"][cfg.policy_name]["pruned"]  # v1 champion, v3 newest: v2 goes
    assert pruned["version"] == versions[1] and pruned["bytes"] > folder_bytes(tiny_model_dir)
    assert folder_bytes(store) == stored

    done = gc.collect_garbage(ws, cfg, keep=1)
    assert done["bytes"]["models"] == pruned["bytes"]
    assert folder_bytes(store) == stored - pruned["bytes"]  # deleted in the server's store, byte for byte
    assert tracking.PRUNED in client.get_model_version(cfg.policy_name, versions[1]).tags
    with pytest.raises(ModelLoadError, match=f"v{versions[1]}, pruned"):
        tracking.resolve_model(ws, f"models:/{cfg.policy_name}/{versions[1]}")
    for ref in (f"models:/{cfg.policy_name}@champion", f"models:/{cfg.policy_name}/{versions[2]}"):
        folder = tracking.resolve_model(ws, ref)  # fetched through the server
        assert (Path(folder) / "model.safetensors").exists()
    # another workspace on the same server shares its registry: another base needs its own project too
    client.set_model_version_tag(cfg.policy_name, versions[0], tracking.BASE, json.dumps(promote.base_identity(cfg)))
    other = init_workspace(tmp_path / "other")
    with pytest.raises(promote.BaseChanged, match=f"with a `project` of its own: the registry of {url} is shared"):
        promote.check_same_base(other, load_config(None, {"models.policy": str(tiny_model_dir)}))
    promote.check_same_base(other, load_config(None, {"models.policy": str(tiny_model_dir), "project": "mine"}))

    # one download per registry version: an alias (or `latest`) is read as the version it names now,
    # so a round's stages share one fetch of a model named by alias (a judge, an initial reward model)
    name = cfg.policy_name
    champion = Path(tracking.resolve_model(ws, f"models:/{name}@champion"))
    (champion / "fetched-once").touch()
    assert Path(tracking.resolve_model(ws, f"models:/{name}@champion")) == champion
    assert Path(tracking.resolve_model(ws, f"models:/{name}/{versions[0]}")) == champion
    assert (champion / "fetched-once").exists()  # not fetched again
    client.set_registered_model_alias(name, tracking.CHAMPION, versions[2])
    moved = Path(tracking.resolve_model(ws, f"models:/{name}@champion"))
    assert moved != champion and moved == Path(tracking.resolve_model(ws, f"models:/{name}/latest"))
    # a registered model deleted and made anew numbers its versions from 1 again: not the cached v1
    client.delete_registered_model(name)
    with mlflow.start_run(run_name="made-anew"):
        assert tracking.log_model(tiny_model_dir, "policy", name).version == versions[0]
    assert Path(tracking.resolve_model(ws, f"models:/{name}/{versions[0]}")) == champion
    assert not (champion / "fetched-once").exists() and (champion / "model.safetensors").exists()


def test_serve_uses_your_tracking_server_and_starts_no_mlflow_of_its_own(tmp_path, monkeypatch, mlflow_server):
    url, _ = mlflow_server
    monkeypatch.setattr(workspace, "USER_TRACKING_URI", url)
    ws = init_workspace(tmp_path / "ws")
    servers = start_servers(ws, prefect_port=free_port(), mlflow_port=free_port())
    try:
        assert servers.mlflow is None and servers.mlflow_url == url  # the UI `rlhf serve` names is yours
        assert servers.prefect.poll() is None
    finally:
        servers.stop()
