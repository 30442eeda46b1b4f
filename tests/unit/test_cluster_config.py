"""The cloud cluster files: Ray's own validator for cluster.yaml; KubeRay manifests match the Serve config."""

from pathlib import Path

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
