"""What every worker process of a local Ray instance runs first (`runtime_env`'s
`worker_process_setup_hook`, set by `runtime.start_local_ray`). Kept free of heavy imports: Ray's
own helper actors run it too."""
from __future__ import annotations

import logging

# Ray Train V2's PlacementGroupCleaner asks the State API every second whether the controller lives;
# a local instance runs without the dashboard that serves that API, so each poll logs a warning.
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_state_api_pollers() -> None:
    """Only errors from the cleaner: its job — removing the placement group of a controller that
    died — is moot on an instance that ends with the driver that started it."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER).setLevel(logging.ERROR)
