"""Where driftloop keeps its state. Resolved on call, never at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def is_object_store(uri: str | Path) -> bool:
    """URI names an object store (s3://, gs://, ...), not the local disk (a path, or file://)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def read_object(uri: str) -> bytes | None:
    """The whole object at an object-store URI, or None when there is none; a store that does not answer raises."""
    import pyarrow.fs as pafs

    fs, key = pafs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_file(key) as f:
            return f.read()
    except FileNotFoundError:
        return None


def put_object(uri: str, data: bytes) -> None:
    """Write an object whole (one PUT replaces it: a reader sees the old one or the new one, never half)."""
    import pyarrow.fs as pafs

    fs, key = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(key) as out:
        out.write(data)


@dataclass(frozen=True)
class Settings:
    """The embedded defaults under one home folder, each overridable by an environment variable."""

    home: Path
    data_root: str
    tracking_uri: str
    ray_address: str | None

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def remote(self) -> bool:
        """The data root is an object store (e.g. s3://bucket/driftloop): state that must outlive a node goes there."""
        return is_object_store(self.data_root)

    @property
    def state_root(self) -> str:
        """Where a monitor's snapshots live: `<data root>/_state` on an object store (a replica rescheduled onto
        another node finds them), else the local state folder. No table can be named `_state/...` (no '/')."""
        return f"{self.data_root.rstrip('/')}/_state" if self.remote else str(self.state_dir)

    @property
    def train_storage(self) -> str:
        """Ray Train's storage_path (trial results and checkpoints): `<data root>/_train` on an object store, so a
        checkpoint written on one node is read on another; else the local `ray_results` folder."""
        return f"{self.data_root.rstrip('/')}/_train" if self.remote else str(self.home / "ray_results")

    def table_uri(self, name: str) -> str:
        """A Delta table's URI under the data root (a local folder or an object-store prefix)."""
        return f"{self.data_root.rstrip('/')}/{name}"

    def ensure(self) -> "Settings":
        """Create the local folders the embedded defaults need (only when they are used)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            Path(self.data_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        return self

    def ensure_tracking_store(self) -> None:
        """MLflow creates and migrates a new sqlite store on first use, and two commands doing that at once (two
        sweeps started together on a fresh folder) break it ("table _alembic_tmp_model_versions already exists"):
        the first use of a sqlite store runs under a file lock, and later ones skip it. Other stores: nothing."""
        uri = self.tracking_uri
        if not uri.startswith("sqlite:///"):
            return
        db = Path(uri[len("sqlite:///"):].split("?")[0])
        ready = db.with_name(db.name + ".ready")
        if ready.exists() and db.exists():
            return
        import fcntl

        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            lock = open(db.with_name(db.name + ".lock"), "a")
        except OSError:
            if db.exists():
                return  # a store this process may read but not write (a read-only mount): MLflow opens it as before
            raise
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if not (ready.exists() and db.exists()):
                for store in (SqlAlchemyStore(uri, str(self.artifacts_dir)), RegistryStore(uri)):
                    store.engine.dispose()
                ready.touch()


def get_settings() -> Settings:
    """Read DRIFTLOOP_HOME, DRIFTLOOP_DATA_ROOT, MLFLOW_TRACKING_URI and RAY_ADDRESS now."""
    home = Path(os.environ.get("DRIFTLOOP_HOME", ".driftloop")).expanduser().resolve()
    data_root = os.environ.get("DRIFTLOOP_DATA_ROOT") or str(home / "tables")
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    return Settings(
        home=home,
        data_root=data_root,
        tracking_uri=tracking,
        ray_address=os.environ.get("RAY_ADDRESS") or None,
    )
