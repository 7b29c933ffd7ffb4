"""Cold and warm wall times of `mnist-pipeline run` on a local store and on an S3-compatible bucket.

One sitting, same machine, same parameters (`--epochs 1 --train-limit 6000 --n-per-class 100`): moto's
S3 server on a loopback port stands in for the bucket. The warm S3 run is made as a second machine
would make it (another directory, PREFECT_HOME and cache directory: its ephemeral Prefect database is
created on that run, which the same-machine warm run does not pay). Prints one JSON object; ``--record`` also
writes it, with the date, commit, CPU model and load it ran under, to ``docs/measured/stores.json``, from which the
docs build renders docs/deploying.md's table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from measured_record import provenance, write_record  # noqa: E402 (bench/, beside this script)

from flows.stack.serve import free_port  # noqa: E402
from storage import Store  # noqa: E402
from tasks.data.fetch import fetch_mnist  # noqa: E402

ARGS = ["--epochs", "1", "--train-limit", "6000", "--n-per-class", "100"]


def timed_run(store: str, machine: Path, env: dict[str, str], *extra: str) -> tuple[float, str]:
    machine.mkdir(parents=True, exist_ok=True)
    env = {**env, "PREFECT_HOME": str(machine / "prefect"), "XDG_CACHE_HOME": str(machine / "cache"), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *ARGS, "--store", store, *extra],
        cwd=machine,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run on {store} failed:\n{done.stderr[-3000:]}")
    steps = next(line for line in done.stdout.splitlines() if line.startswith("Steps:"))
    return round(seconds, 1), steps.split(":", 1)[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="also write docs/measured/stores.json for the docs")
    args = parser.parse_args()
    measured = provenance()
    data = Store(os.environ.get("MNIST_STORE", str(REPO / "artifacts")))
    dataset = fetch_mnist(data, log=lambda _: None)
    with tempfile.TemporaryDirectory(prefix="mnist-bench-stores-") as tmp:
        tmp = Path(tmp)
        source = tmp / "idx"
        source.mkdir()
        for name, stored in dataset.files.items():
            (source / name).write_bytes(data.read_bytes(stored.key))

        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        moto = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(endpoint, timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            aws = {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            env = {**os.environ, **aws, "TF_CPP_MIN_LOG_LEVEL": "2"}
            import s3fs

            s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench").mkdir("mnist")
            print("local store: cold, warm; S3: cold, warm, warm from a second machine", file=sys.stderr)
            local = str(tmp / "local-store")
            results = {
                "local_cold": timed_run(local, tmp / "machine-a", env, "--mnist-source", str(source)),
                "local_warm": timed_run(local, tmp / "machine-a", env),
                "s3_cold": timed_run("s3://mnist/quick", tmp / "machine-a", env, "--mnist-source", str(source)),
                "s3_warm_same_machine": timed_run("s3://mnist/quick", tmp / "machine-a", env),
                "s3_warm_second_machine": timed_run("s3://mnist/quick", tmp / "machine-b", env),  # a fresh PREFECT_HOME too
            }
        finally:
            moto.terminate()
            moto.wait()
    result = {name: {"seconds": s, "steps": steps} for name, (s, steps) in results.items()}
    print(json.dumps(result, indent=2))
    if args.record:
        out = write_record("stores.json", {**measured, "arguments": " ".join(ARGS), "runs": result})
        print(f"recorded in {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
