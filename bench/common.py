"""Shared set-up for the benchmarks: a private DRIFTLOOP_HOME, local Ray, one trained digits champion."""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    import psutil
    import ray
    import torch

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "platform": platform.platform()}


def setup_home(name: str) -> Path:
    import shutil

    home = ROOT / ".driftloop" / "bench" / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    os.environ.update({"DRIFTLOOP_HOME": str(home), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                       "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "DRIFTLOOP_POLL_S": "1.0"})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return home


def train_champion(epochs: int = 10):
    """Ingest digits and train one model (no sweep) with Ray Train; register and promote it."""
    from driftloop.cluster import ensure_ray
    from driftloop.config import load_spec, parse_spec
    from driftloop.data import tables
    from driftloop.data.ingest import ingest
    from driftloop.registry import client, experiment_id
    from driftloop.settings import get_settings
    from driftloop.gate import register_and_gate
    from driftloop.train import default_hparams, make_trainer

    s = get_settings().ensure()
    d = load_spec(ROOT / "configs/digits.yaml").model_dump(mode="json")
    d["training"]["epochs"] = epochs
    spec = parse_spec(d)
    ingest("digits", s.table_uri("digits"), spec.dataset)
    dv = tables.data_version(s.table_uri("digits"))
    ensure_ray(s, join_running=False)
    res = make_trainer(spec, dv, default_hparams(spec), "bench", str(s.home / "ray_results")).fit()
    run = client(s).create_run(experiment_id(s, spec.name), run_name="bench")
    with res.checkpoint.as_directory() as ckpt:
        out = register_and_gate(spec, s, dv, Path(ckpt), run.info.run_id)
    return spec, s, out


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a rate k/n (sound at k = 0 and for small n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def cpu_by_process(names: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process this user runs, keyed by what it is: an actor's label
    from the sampler (names), else its program (a Python process by its script or module)."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        try:
            ct, cmd = p.info["cpu_times"], p.info["cmdline"] or []
        except psutil.Error:
            continue
        if ct is None:
            continue
        if p.info["pid"] in names:
            key = names[p.info["pid"]]
        elif p.info["pid"] == os.getpid():
            key = "bench (this process)"
        elif cmd and cmd[0].startswith("ray::"):
            key = cmd[0].split()[0][:40]
        elif cmd:
            prog = os.path.basename(cmd[0])
            script = next((os.path.basename(a) for a in cmd[1:] if a.endswith(".py") or a.startswith("-m")), "")
            key = f"{prog} {script}".strip()[:40]
        else:
            key = "other"
        out[key] = out.get(key, 0.0) + ct.user + ct.system
    return out
