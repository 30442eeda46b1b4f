"""Helper process for the worker-node-death test: a two-node local Ray cluster (`ray.cluster_utils.Cluster`),
distributed training on the worker node with its checkpoints on --storage (a folder or s3://...), that node killed
after a checkpoint, a replacement node joining (what
the autoscaler does), and training resuming from the checkpoint. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--storage", required=True)
    a = p.parse_args()

    import pyarrow.fs
    import ray
    from ray.cluster_utils import Cluster

    from driftloop.config import parse_spec
    from driftloop.data.tables import DataVersion
    from driftloop.train import default_hparams, make_trainer

    d = json.loads(a.spec)
    d["training"].update(epochs=8, checkpoint_every=1, max_failures=3, workers=2, cpus_per_worker=1.0)
    spec = parse_spec(d)
    dv = DataVersion(**json.loads(a.data))
    mem = 150 * 1024**2
    # the head has room for the driver and Train's controller, not for the two 1-CPU workers
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": mem,
                                                             "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, object_store_memory=mem)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    storage = a.storage  # a folder or an object-store URI (s3://...): where Train persists checkpoints
    fs, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else str(Path(storage).resolve()))
    out: dict = {"epochs": spec.training.epochs}
    box: dict = {}

    def fit():
        try:
            box["result"] = make_trainer(spec, dv, default_hparams(spec), "two-node", storage).fit()
        except Exception as err:  # reported, not raised: the JSON line says what happened
            box["error"] = f"{type(err).__name__}: {err}"

    t = threading.Thread(target=fit)
    t0 = time.monotonic()
    t.start()
    deadline = time.monotonic() + 240
    seen: set[str] = set()  # checkpoints persisted so far (Train keeps only the newest two)
    while len(seen) < 3 and time.monotonic() < deadline and t.is_alive():
        seen |= {f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
                 if f.path.endswith("/model.pt")}
        time.sleep(0.2)
    # by the third persisted checkpoint the controller has registered an earlier one to resume from
    out["node_removed_after_epoch"] = len(seen) - 1
    cluster.remove_node(worker, allow_graceful=False)  # the node dies with its workers
    out["node_removed_at_s"] = round(time.monotonic() - t0, 1)
    time.sleep(2)
    cluster.add_node(num_cpus=2, object_store_memory=mem)  # the replacement the autoscaler would start
    t.join(360)
    res = box.get("result")
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["error"] = box.get("error") or (str(res.error) if res is not None and res.error else None)
    if res is not None and res.metrics:
        out["final_epoch"] = int(res.metrics["epoch"])
        out["resumed_from_epoch"] = int(res.metrics["resumed_from_epoch"])
        out["val_accuracy"] = round(float(res.metrics["val_accuracy"]), 4)
    if res is not None and res.checkpoint is not None:
        out["checkpoint"] = res.checkpoint.path  # on S3: bucket/key, without the scheme
    print(json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
