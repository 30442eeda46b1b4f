"""Ray job entrypoint: retrain on the newest data version, gate against the champion, promote.

    ray job submit -- python jobs/retrain.py --config configs/digits.yaml --reason manual

The drift monitor submits the same code (`python -m driftloop.retrain`) with a deterministic
submission id, so that simultaneous triggers for one champion make exactly one job.
"""

import sys

from driftloop.retrain import main

if __name__ == "__main__":
    sys.exit(main())
