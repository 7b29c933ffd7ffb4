"""The child process that trains on another Keras backend than its parent's (see ``tasks/training/backends.py``).

Started as ``python -m tasks.training.backend_child ARGUMENTS_JSON`` with ``KERAS_BACKEND`` set; it reports on
stdout in lines the parent reads: each log line, each finished epoch, then the model's reference.
"""

from __future__ import annotations

import json
import sys

from storage import Store
from tasks.data.fetch import DatasetRef
from tasks.training.backends import MESSAGE
from tasks.training.loop import train_and_store
from tasks.training.train import TrainConfig


def _send(**message) -> None:
    print(MESSAGE + json.dumps(message, default=float), flush=True)


def main(argv: list[str]) -> int:
    """The child's side: train with ``tasks.training.train`` on this process's backend and report back. The arguments
    come on standard input (a JSON object), never the command line, which every user of the machine can read."""
    arguments = json.loads(argv[0] if argv else sys.stdin.readline())
    store = Store(arguments["store"])
    ref = train_and_store(
        store,
        DatasetRef.model_validate(arguments["dataset"]),
        TrainConfig.model_validate(arguments["config"]),
        arguments["key"],
        log=lambda text: _send(log=text),
        on_epoch=lambda done, total, row: _send(epoch=[done, total, row]),
    )
    _send(result=ref.model_dump(mode="json"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
