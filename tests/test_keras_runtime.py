"""TensorFlow's benign start-up lines are filtered from stderr; anything else written there is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasks.training.keras_runtime import filtered_stderr, is_benign

REPO = Path(__file__).resolve().parent.parent
BANNER = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795661677.025805    8068 port.cc:153] oneDNN custom operations are on. You may see slightly different",
    "I0000 00:00:1795661677.026121    8068 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
]
CUINIT = "E0000 00:00:1795661679.584043    8068 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error"


def test_only_the_known_banner_is_benign():
    assert all(is_benign(line, driver=False) for line in BANNER)
    assert is_benign(CUINIT, driver=False) and not is_benign(CUINIT, driver=True)  # with a driver, a failed cuInit matters
    assert not is_benign("E0000 00:00:1.0 1 some_kernel.cc:1] out of memory", driver=False)
    assert not is_benign("Traceback (most recent call last):", driver=False)


def test_a_real_problem_written_at_the_file_descriptor_still_shows(capfd):
    with filtered_stderr(driver=False):
        for line in [*BANNER, CUINIT, "E0000 00:00:1.0 1 allocator.cc:1] real trouble"]:
            os.write(2, (line + "\n").encode())
    err = capfd.readouterr().err
    assert err.strip() == "E0000 00:00:1.0 1 allocator.cc:1] real trouble"


def test_importing_keras_prints_nothing_on_a_healthy_machine():
    done = subprocess.run(
        [sys.executable, "-c", "from tasks.training.keras_runtime import import_keras; import_keras().layers.Dense(1)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""
