"""Installs are pinned: requirements.lock holds every requirement of pyproject.toml (and of the dev extras
`make test` installs) at one version inside its range, with hashes. After pyproject.toml changes, this
fails until `make lock` has been run."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def locked() -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes) from the lock."""
    text = (REPO / "requirements.lock").read_text()
    found = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = block.split("\n", 1)[0]
        if not (m := re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s\\;]+)", first)):
            continue
        name = canonicalize_name(m.group(1).split("[")[0])
        found[name] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return found


def test_every_requirement_is_pinned_inside_its_range_with_hashes():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = locked()
    assert len(pins) > 50  # the whole tree, not just the direct requirements
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is in pyproject.toml but not in requirements.lock: run `make lock`"
        version, hashes = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside pyproject.toml's {requirement}: run `make lock`"
        )
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version} has no hash in requirements.lock"


def test_keras_is_pinned_to_a_release_with_the_published_fixes():
    version = tuple(int(p) for p in locked()["keras"][0].split(".")[:2])
    assert version >= (3, 14)
