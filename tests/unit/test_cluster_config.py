"""The cloud cluster files: Ray's own validator for cluster.yaml and its MLflow server run here; the KubeRay manifests
match the Serve config, give every pod the head's environment, and pull the image the Dockerfile builds."""

import os
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # fills Ray's defaults, then raises on any schema violation
    assert cfg["provider"]["type"] == "aws"
    assert {"head", "cpu_worker", "gpu_worker"} <= set(cfg["available_node_types"])
    start = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    assert any("mlflow server" in c for c in cfg["head_setup_commands"])


def test_kuberay_manifests_reference_the_same_serve_config():
    service = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    job = yaml.safe_load((ROOT / "deploy/kuberay/rayjob-sweep.yaml").read_text())
    assert service["kind"] == "RayService" and job["kind"] == "RayJob"
    assert service["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    inline = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "serve_configs/digits.yaml").read_text())
    assert inline["applications"] == shipped["applications"]
    assert job["spec"]["entrypoint"] == "python jobs/sweep.py --config configs/digits.yaml"
    env = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in env


def test_every_shipped_serve_config_passes_serves_schema():
    """What `serve deploy` checks first: each file in serve_configs/ is valid YAML and a valid ServeDeploySchema,
    bound to loopback, with the shipped deployment settings."""
    from ray.serve.schema import ServeDeploySchema

    files = sorted((ROOT / "serve_configs").glob("*.yaml"))
    assert {f.name for f in files} >= {"all.yaml", "digits.yaml", "rainfall.yaml"}
    for f in files:
        cfg = ServeDeploySchema.model_validate(yaml.safe_load(f.read_text()))
        assert cfg.http_options.host == "127.0.0.1", f.name
        for app in cfg.applications:
            deps = {d.name: d for d in app.deployments}
            assert set(deps) == {"Predictor", "DriftMonitor"}, f.name
            assert all(d.health_check_period_s == 2 for d in deps.values()), f.name
            auto = deps["Predictor"].autoscaling_config  # scales out under load, never below 2 (rolling updates)
            auto = auto if isinstance(auto, dict) else auto.model_dump()
            assert auto["min_replicas"] == 2 and auto["max_replicas"] >= 4 and auto["target_ongoing_requests"] > 0, f.name
            assert deps["DriftMonitor"].num_replicas == 1, f.name


def test_serving_a_second_model_keeps_the_running_ones_and_refuses_a_taken_route():
    """Serve's deploy deletes every application its config leaves out: `driftloop serve wine.yaml` on a head that
    serves digits must deploy digits' last config beside wine, replace an application of the same name, and refuse
    (before anything is deployed) a route that a running application already serves."""
    import pytest

    from driftloop.errors import LoopError
    from driftloop.serving.deploy import keep_running

    digits = {"name": "digits", "route_prefix": "/digits", "import_path": "driftloop.serving.app:build"}
    running = {"applications": {
        "digits": {"status": "RUNNING", "deployed_app_config": digits},
        "wine": {"status": "RUNNING", "deployed_app_config": {"name": "wine", "route_prefix": "/wine-old"}},
        "gone": {"status": "DELETING", "deployed_app_config": {"name": "gone", "route_prefix": "/gone"}},
        "by_serve_run": {"status": "RUNNING", "route_prefix": "/mine", "deployed_app_config": None}}}
    cfg = {"applications": [{"name": "wine", "route_prefix": "/wine"}]}
    assert keep_running(running, cfg) == ["digits"]
    assert cfg["applications"] == [{"name": "wine", "route_prefix": "/wine"}, digits]
    taken = {"applications": [{"name": "cancer", "route_prefix": "/digits"}]}
    with pytest.raises(LoopError, match="route /digits of application 'cancer' is served by the running application 'digits'"):
        keep_running(running, taken)
    with pytest.raises(LoopError, match="served by the running application 'by_serve_run'"):
        keep_running(running, {"applications": [{"name": "mine", "route_prefix": "/mine"}]})
    assert keep_running({}, {"applications": []}) == []


def test_driftloop_haproxy_keeps_rays_haproxy_config_on_loopback(monkeypatch, tmp_path):
    """Ray's own HAProxy template binds the stats page and the metrics exporter on every interface and opens the
    admin socket to every local user; the config driftloop-haproxy hands to HAProxy binds those two to 127.0.0.1,
    keeps the HTTP and gRPC frontends where Serve's options put them (`*` for 0.0.0.0, as on KubeRay), and passes
    Ray's arguments through unchanged to the real HAProxy, never to itself."""
    import re

    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    from driftloop.serving import haproxy

    def render(frontend: str) -> str:
        values = {"frontend_host": frontend, "grpc_frontend_host": frontend, "socket_path": "/tmp/h/admin.sock",
                  "metrics_port": "9101", "stats_port": "8404", "frontend_port": "8000", "grpc_frontend_port": "9000"}
        return re.sub(r"\{\{\s*config\.(\w+)\s*\}\}", lambda m: values.get(m.group(1), "x"), HAPROXY_CONFIG_TEMPLATE)

    def binds(text: str) -> list[str]:
        return [ln.split()[1] for ln in text.splitlines() if ln.strip().startswith("bind ")]

    for frontend in ("*", "10.0.0.5", "127.0.0.1"):
        rendered = render(frontend)
        safe = haproxy.loopback(rendered)
        assert sorted(binds(safe)) == sorted([f"{frontend}:8000", f"{frontend}:9000", "127.0.0.1:8404", "127.0.0.1:9101"])
        assert "mode 666" in rendered and "mode 666" not in safe and "mode 600" in safe
    assert "192.168.1.2:8404" in binds(haproxy.loopback(render("*"), "192.168.1.2"))  # DRIFTLOOP_HAPROXY_STATS_HOST

    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render("*"))
    ran = []
    monkeypatch.setattr(haproxy.os, "execv", lambda binary, argv: ran.append(argv))
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", haproxy.haproxy_env()["RAY_SERVE_HAPROXY_BINARY_PATH"])
    monkeypatch.delenv("DRIFTLOOP_HAPROXY_BINARY", raising=False)
    args = ["-db", "-f", str(cfg), "-dR", "-sf", "11", "12", "-x", "/tmp/h/admin.sock"]
    haproxy.main(args)
    assert Path(ran[0][0]).name == "haproxy" and "driftloop" not in ran[0][0] and ran[0][1:] == args
    assert sorted(binds(cfg.read_text())) == ["*:8000", "*:9000", "127.0.0.1:8404", "127.0.0.1:9101"]
    monkeypatch.setenv("DRIFTLOOP_HAPROXY_BINARY", "/opt/own/haproxy")                # a binary you chose yourself
    haproxy.main(args)
    assert ran[1][0] == "/opt/own/haproxy"


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            steps.append((keyword.upper(), args.strip()))
    return steps


def test_the_dockerfile_installs_what_make_installs_and_the_manifests_name_its_image():
    """No container tool runs here, so the image is checked against its sources: the Python pyproject.toml asks
    for, the torch it pins (from the CPU index), the project installed from the same pyproject.toml as `make setup`,
    every file the manifests run copied in, a non-root user, and the image name the manifests pull."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    steps = _dockerfile()
    base = next(a for k, a in steps if k == "FROM")
    python = re.match(r"python:(\d+\.\d+)", base).group(1)
    assert f"{python}.0" in SpecifierSet(project["requires-python"]), (base, project["requires-python"])
    runs = " && ".join(a for k, a in steps if k == "RUN")
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    assert f"--index-url https://download.pytorch.org/whl/cpu {torch_pin}" in runs, runs
    make = (ROOT / "Makefile").read_text()
    assert "pip install -q -e '.[dev]'" in make  # make: the project from this pyproject.toml, editable, with test tools
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs), runs  # the image: the same project, no test tools
    # what is copied in: the build's inputs and every path the manifests and the Serve config run from
    copied = {src for k, a in steps if k == "COPY" for src in a.split()[:-1] if not src.startswith("--")}
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()}
    assert {"pyproject.toml", project["readme"], "src"} <= copied and not copied & ignored
    assert all((ROOT / src).exists() for src in copied), copied
    job = yaml.safe_load((ROOT / "deploy/kuberay/rayjob-sweep.yaml").read_text())
    needed = [p for p in job["spec"]["entrypoint"].split() if "/" in p]
    service = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    needed += [a["args"]["spec"] for a in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]]
    assert all(Path(p).parts[0] in copied for p in needed), (needed, copied)
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    images = set(re.findall(r"image:\s*(\S+)", (ROOT / "deploy/kuberay/rayservice.yaml").read_text()
                            + (ROOT / "deploy/kuberay/rayjob-sweep.yaml").read_text()))
    assert images == {f"ghcr.io/driftloop/driftloop:{project['version']}"}, images


def _containers(manifest: dict) -> list[dict]:
    cluster = manifest["spec"].get("rayClusterConfig") or manifest["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_pod_of_the_manifests_gets_the_heads_environment_and_the_images_workdir():
    """Replicas and trials land on worker pods: each pod needs the data root, the tracking URI and Ray's token
    mode, and every pod of the RayService the admin token (a replica on a worker pod answered admin calls 403)."""
    workdir = next(a for k, a in _dockerfile() if k == "WORKDIR")
    for name in ("rayservice", "rayjob-sweep"):
        containers = _containers(yaml.safe_load((ROOT / f"deploy/kuberay/{name}.yaml").read_text()))
        assert len(containers) >= 2
        envs = [{e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])} for c in containers]
        assert all(e == envs[0] for e in envs), (name, envs)
        assert {"RAY_AUTH_MODE", "DRIFTLOOP_DATA_ROOT", "MLFLOW_TRACKING_URI"} <= set(envs[0]), name
        if name == "rayservice":
            assert envs[0]["DRIFTLOOP_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "driftloop-admin", "key": "token"}}
        assert {c.get("workingDir") for c in containers} == {workdir}, name


def test_cluster_files_set_the_environment_driftloop_cluster_env_prints():
    """One recipe for a node's environment (envs.cluster_env, printed by `driftloop cluster-env`): every pod of the
    manifests and every node of cluster.yaml sets each of its variables to its value, and each secret it names
    from a secret store (the admin token where replicas run)."""
    from driftloop.envs import CLUSTER_SECRETS, cluster_env

    for name in ("rayservice", "rayjob-sweep"):
        for c in _containers(yaml.safe_load((ROOT / f"deploy/kuberay/{name}.yaml").read_text())):
            env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}
            want = cluster_env(env["DRIFTLOOP_DATA_ROOT"], env["MLFLOW_TRACKING_URI"])
            assert {k: env.get(k) for k in want} == want, (name, c["name"])
            secrets = set(CLUSTER_SECRETS) - ({"DRIFTLOOP_ADMIN_TOKEN"} if name == "rayjob-sweep" else set())
            assert all("secretKeyRef" in (env.get(k) or {}) for k in secrets), (name, c["name"], env)
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    lines = [ln for key in ("setup_commands", "head_setup_commands", "worker_start_ray_commands") for ln in cfg[key]]
    exported = dict(re.findall(r"""['"]export (\w+)=([^'"]*)['"]""", "\n".join(lines)))
    want = cluster_env(exported["DRIFTLOOP_DATA_ROOT"], "http://head:5000")
    assert {k: exported.get(k) for k in want if k != "MLFLOW_TRACKING_URI"} == \
        {k: v for k, v in want.items() if k != "MLFLOW_TRACKING_URI"}, exported
    assert "MLFLOW_TRACKING_URI" in exported and set(CLUSTER_SECRETS) <= set(exported), exported
    assert all(exported[k].startswith("$(aws secretsmanager") for k in CLUSTER_SECRETS if not k.endswith("USERNAME"))


def test_cluster_yamls_node_environment_is_written_once_however_often_setup_and_start_run(tmp_path):
    """cluster.yaml's commands that write a node's environment, run here by bash three times (a re-run of `ray up`,
    restarts): ~/.bashrc sources one file once, each variable is exported once, and a login shell gets the values
    `driftloop cluster-env` names (Secrets Manager is a stand-in `aws`)."""
    import subprocess

    from driftloop.envs import cluster_env

    bin_, home = tmp_path / "bin", tmp_path / "home"
    bin_.mkdir()
    home.mkdir()
    (home / ".bashrc").write_text("# the image's own .bashrc\n")
    aws = bin_ / "aws"
    aws.write_text('#!/bin/sh\necho "secret-of-$4"\n')
    aws.chmod(0o755)
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    writes = [c for key in ("setup_commands", "head_setup_commands", "worker_start_ray_commands") for c in cfg[key]
              if "~/.bashrc" in c or "~/.driftloop_" in c]
    script = "\n".join(writes).replace("hostname -I", "echo 10.0.0.5")
    env = {"HOME": str(home), "PATH": f"{bin_}:/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.5"}
    for _ in range(3):
        done = subprocess.run(["bash", "-c", script], env=env, cwd=home, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    bashrc = (home / ".bashrc").read_text()
    assert bashrc.count("driftloop") == 1, bashrc
    exports = re.findall(r"^export (\w+)=", (home / ".driftloop_env").read_text(), re.M)
    assert len(exports) == len(set(exports)), exports
    shell = subprocess.run(["bash", "-c", ". ~/.bashrc && env"], env=env, cwd=home, capture_output=True, text=True, timeout=30)
    got = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
    want = cluster_env("s3://YOUR-BUCKET/driftloop/tables", "http://10.0.0.5:5000")
    assert {k: got.get(k) for k in want} == want, got
    assert got["MLFLOW_TRACKING_PASSWORD"] == "secret-of-driftloop/mlflow-user"
    assert got["PATH"].split(":").count(f"{home}/driftloop/.venv/bin") == 1


@pytest.mark.slow
def test_cluster_yamls_mlflow_server_answers_only_with_credentials_and_keeps_secrets_off_its_command_line(
        tmp_path, monkeypatch):
    """cluster.yaml's own head commands, run here by bash: Secrets Manager is a stand-in `aws`, Postgres is sqlite,
    S3 a folder, and the server runs one worker, not four (2 cores here). The server binds the head's address only,
    answers nothing without credentials, serves driftloop's registry calls with them, and no secret is on a command
    line."""
    import stat
    import subprocess
    import sys

    import httpx
    import psutil

    from driftloop import registry
    from driftloop.settings import get_settings
    from tests.conftest import free_port
    from tests.integration.conftest import answers_200, wait_for

    secrets = {"driftloop/mlflow-db": "db-Secret-1", "driftloop/mlflow-admin": "admin-Secret-2",
               "driftloop/mlflow-flask-key": "flask-Secret-3"}
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    aws = bin_ / "aws"  # `aws secretsmanager get-secret-value --secret-id ID --query SecretString --output text`
    aws.write_text("#!/bin/sh\n" + "".join(f'[ "$4" = "{k}" ] && echo "{v}"\n' for k, v in secrets.items()))
    aws.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    script = "\n".join(cfg["head_setup_commands"])
    script = re.sub(r"postgresql://mlflow:\$\([^)]*\)@YOUR-RDS-HOST:5432/(\w+)", rf"sqlite:///{tmp_path}/\1.db", script)
    script = (script.replace("s3://YOUR-BUCKET/driftloop/mlflow", str(tmp_path / "artifacts"))
              .replace("~/driftloop/.venv/bin/mlflow", str(Path(sys.executable).with_name("mlflow")))
              .replace("--port 5000", f"--port {port} --workers 1").replace("hostname -I", "echo 127.0.0.1"))
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_}:{os.environ['PATH']}"}
    started = subprocess.run(["bash", "-c", script], env=env, cwd=home, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        log = home / "mlflow.log"
        try:
            wait_for(lambda: log.exists() and answers_200(f"{url}/health"), 120, what="the MLflow server")
        except AssertionError:
            raise AssertionError("the MLflow server did not answer: " + log.read_text()[-1500:]) from None
        ini = home / ".mlflow" / "basic_auth.ini"
        assert stat.S_IMODE(ini.stat().st_mode) == 0o600
        server = [p for p in psutil.process_iter(["cmdline"]) if "--app-name" in (p.info["cmdline"] or [])]
        assert server, "no mlflow server process"
        for p in server:
            line = " ".join(p.info["cmdline"])
            assert not any(s in line for s in secrets.values()), line
            listening = {c.laddr.ip for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
            assert listening <= {"127.0.0.1"}, listening  # the head's address (here 127.0.0.1), never 0.0.0.0
        bare = httpx.get(f"{url}/api/2.0/mlflow/registered-models/search", timeout=10)
        assert bare.status_code == 401, bare.text
        monkeypatch.setenv("DRIFTLOOP_HOME", str(tmp_path / "client"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(registry.RegistryUnavailable, match="401|Unauthorized|credentials"):
            registry.champion_version(get_settings(), "digits")  # refused: an error, never "no champion"
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets["driftloop/mlflow-admin"])
        assert registry.champion_version(get_settings(), "digits") is None  # answered: no such model yet
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if str(port) in " ".join(p.info["cmdline"] or []) and "mlflow" in " ".join(p.info["cmdline"] or []):
                try:  # its server workers too: spawned children whose command lines name neither
                    for child in p.children(recursive=True):
                        child.kill()
                    p.kill()
                except psutil.Error:
                    pass



def test_driftloop_cluster_env_is_the_readmes_block_and_refuses_one_node_stores():
    import shlex

    from tests.conftest import run_cli

    block = re.search(r"<!-- cluster-env -->\n```console\n\$ ([^\n]*)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README's cluster-env block"
    args = shlex.split(block.group(1))[1:]
    r = run_cli(*args, env={"DRIFTLOOP_DATA_ROOT": "", "MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0 and r.stdout == block.group(2), r.stdout + r.stderr
    for bad, said in ((["--data-root", "/data/tables"], "is a local folder"),
                      (["--tracking-uri", "sqlite:///mlflow.db"], "is not an MLflow server"),
                      (["--retrain-resources", "[1]"], "not a JSON object of resource amounts")):
        given = dict(zip(args[1::2], args[2::2])) | dict([bad])
        r = run_cli("cluster-env", *[x for kv in given.items() for x in kv])
        assert r.returncode == 2 and said in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "secret" not in r.stdout
