"""Does the Prefect UI render markup from an artifact's untrusted strings? A manual check in a real browser.

It starts a throwaway Prefect server (its own ``PREFECT_HOME``, no auth, loopback), creates two markdown
artifacts holding a raw ``<img>`` and a markdown image, one as is and one through ``md_text``
(``tasks/publish/markdown.py``), opens each artifact's page in headless Chromium (``--dump-dom``) and prints, as
one JSON object, how many ``<img>`` elements pointing at the marker URL each page has. Needs ``chromium`` on
the PATH. Not part of ``make test``: it takes a minute and a browser.

    python bench/markdown_in_ui.py [--port 4299]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.publish.markdown import md_text  # noqa: E402


def hostile(port: int) -> str:
    marker = f"http://127.0.0.1:{port}/api/health?marker="
    return f'<img src="{marker}raw-html" alt="evil"> ![x]({marker}markdown-image)'


def wait_healthy(api: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"the server at {api} did not answer within {seconds:.0f} s")


def create_artifacts(api: str, port: int) -> dict[str, str]:
    os.environ["PREFECT_API_URL"] = api
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    text = hostile(port)
    bodies = {"raw": text, "md_text": md_text(text)}
    with get_client(sync_client=True) as client:
        return {
            name: str(
                client.create_artifact(
                    ArtifactCreate(key=f"markup-{name.replace('_', '-')}", type="markdown", data=f"| file |\n|---|\n| {body} |")
                ).id
            )
            for name, body in bodies.items()
        }


def rendered_images(url: str, port: int) -> int:
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    return len(re.findall(rf'<img[^>]*src="http://127\.0\.0\.1:{port}/api/health\?marker=', dom))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4299)
    args = parser.parse_args()
    api = f"http://127.0.0.1:{args.port}/api"
    with tempfile.TemporaryDirectory(prefix="markdown-ui-") as home:
        env = {**os.environ, "PREFECT_HOME": home, "PREFECT_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(args.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_healthy(api)
            ids = create_artifacts(api, args.port)
            from prefect import __version__ as prefect_version

            images = {
                name: rendered_images(f"http://127.0.0.1:{args.port}/artifacts/artifact/{i}", args.port)
                for name, i in ids.items()
            }
        finally:
            server.terminate()
            server.wait(timeout=60)
    chromium = subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"prefect": prefect_version, "browser": chromium, "img_elements": images}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
