"""Ray job entrypoint: a sweep, exactly as `driftloop sweep` runs it.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/digits.yaml
"""

import sys

from driftloop.cli import app

if __name__ == "__main__":
    sys.argv = ["driftloop", "sweep", *[a for a in sys.argv[1:] if a != "--config"]]
    app()
