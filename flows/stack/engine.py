"""What a confined worker's flow-run process executes: Prefect's own engine (``python -m prefect.engine``) with
one difference, it runs this checkout's flow and never what the deployment names.

Prefect's engine reads the run's deployment from the API in this process and runs its pull steps and its
entrypoint. Whoever holds the API's auth string can edit those at any moment, also after the worker checked
them (``flows/stack/worker.py``), and a pull step can install packages (``requires``) or run a shell script. This engine
reads the flow run from the API and runs ``flows.night.pipeline.mnist_retrain`` from the code beside it: no pull step, no
entrypoint and no code path from the API is ever used; and it ends on the run's final state without reading its
result, which a caller could have forced to name a block and a serializer of their choosing.
"""

from __future__ import annotations

import os
import sys
from uuid import UUID


def main() -> None:
    from prefect._internal.control_listener import configure_from_env
    from prefect.engine import _drive_run_flow_result, engine_logger, handle_engine_signals

    try:
        flow_run_id = UUID(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PREFECT__FLOW_RUN_ID", ""))
    except ValueError:
        engine_logger.error(f"Invalid flow run id. Received arguments: {sys.argv}")
        sys.exit(1)
    configure_from_env()  # the worker's cancel and stop signals, as Prefect's engine does
    with handle_engine_signals(flow_run_id):
        from prefect._internal.metrics import RunMetrics
        from prefect.flow_engine import flow_run_logger, load_flow_run, run_flow

        from flows.night.pipeline import mnist_retrain

        flow_run = load_flow_run(flow_run_id=flow_run_id)
        run_logger = flow_run_logger(flow_run=flow_run)
        with RunMetrics(flow_run, mnist_retrain):
            # The final state, never its result: a state forced through the API (Completed, with result metadata
            # naming a block and the pickle serializer) would otherwise be read and unpickled here.
            state = run_flow(mnist_retrain, flow_run=flow_run, error_logger=run_logger, return_type="state")
            _drive_run_flow_result(mnist_retrain, state)


if __name__ == "__main__":
    main()
