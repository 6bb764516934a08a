"""The Dockerfile installs what setup.py pins (no engine runs here, so its text is checked)."""
from __future__ import annotations

import ast
import re

from conftest import ROOT


def setup_requirements() -> dict[str, str]:
    """name -> version spec from setup.py's INSTALL_REQUIRES and extras, read without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    specs: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS"):
            value = ast.literal_eval(node.value)
            specs += value if isinstance(value, list) else [s for group in value.values() for s in group]
    out = {}
    for spec in specs:
        name, op, version = re.match(r"([A-Za-z0-9_.-]+)\s*([=<>!~]=?|)\s*(.*)", spec).groups()
        out[name.lower()] = f"{op}{version}"
    return out


def test_dockerfile_installs_setup_py_and_agrees_with_its_pins():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    requirements = setup_requirements()
    assert re.search(r"pip install -e '\.\[dev\]'", text), "the image must install the package from setup.py"
    assert "COPY setup.py" in text
    for name, version in re.findall(r"\b([A-Za-z][A-Za-z0-9_.-]*)==([0-9][^\s'\"]*)", text):
        assert requirements.get(name.lower()) == f"=={version}", f"Dockerfile pins {name}=={version}"
    # the supervisor is PID 1, so `docker stop` reaches the ranks and waits for their checkpoint
    assert 'ENTRYPOINT ["python", "launch/supervise.py", "--", "deepspeed"]' in text


def test_base_image_torch_satisfies_the_setup_py_range():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    major, minor = map(int, re.search(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda", text).groups())
    low = re.match(r">=(\d+)\.(\d+)", setup_requirements()["torch"]).groups()
    assert (major, minor) >= tuple(map(int, low))
