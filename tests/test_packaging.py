"""`pip install .` in a new virtual environment: the three runtime dependencies and nothing else."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).parent.parent

# Run inside the new environment: what post_response requires, and everything installed.
INSPECT = """
import json, re
from importlib import metadata
import post_response

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def requirements(dist):
    found = []
    for requirement in metadata.requires(dist) or []:
        name, _, marker = requirement.partition(";")
        if "extra ==" in marker or (marker and not eval_marker(marker)):
            continue
        found.append(norm(re.split(r"[\\s<>=!~\\[(]", name.strip())[0]))
    return found

def eval_marker(marker):
    from pip._vendor.packaging.markers import Marker
    return Marker(marker.strip()).evaluate()

closure, todo = set(), ["post-response"]
while todo:
    dist = todo.pop()
    if dist not in closure:
        closure.add(dist)
        todo += requirements(dist)
installed = {norm(d.metadata["Name"]) for d in metadata.distributions()}
print(json.dumps({
    "version": post_response.__version__,
    "direct": sorted(requirements("post-response")),
    "closure": sorted(closure),
    "installed": sorted(installed - {"pip", "setuptools", "wheel"}),
    "extras": sorted(metadata.metadata("post-response").get_all("Provides-Extra") or []),
    "typed": (metadata.files("post-response") and any(
        str(f).endswith("post_response/py.typed") for f in metadata.files("post-response"))),
}))
"""


def test_pip_install_brings_only_the_runtime_dependencies(tmp_path: Path) -> None:
    """A plain install brings anyio, asgiref, contextvars-extras (and theirs), nothing else;
    the extras are the integrations' and the test suite's, not the benchmarks' peers."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    found = json.loads(
        subprocess.run(
            [python, "-c", INSPECT], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    )
    import post_response

    assert found["version"] == post_response.__version__
    assert found["direct"] == ["anyio", "asgiref", "contextvars-extras"]
    assert found["installed"] == found["closure"]  # nothing beyond what those three need
    assert found["extras"] == ["celery", "demo", "otel", "test"]  # benchmarks/requirements.txt
    assert found["typed"]
