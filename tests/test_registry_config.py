"""pyproject.toml says what the Comfy Registry reads, in the forms its parser accepts (comfy-cli's
registry/config_parser.py; `comfy node validate` runs it and the ruff security rules S102, S307, E702)."""
import re

import pytest

from conftest import REPO_ROOT

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
REGISTRY_OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}


def test_classifiers_are_ones_the_registry_reads():
    """One unknown OS or accelerator classifier makes the registry drop all of its kind."""
    classifiers = PYPROJECT["project"]["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert systems and all(s.startswith(REGISTRY_OS_PREFIXES) for s in systems)
    assert accelerators and set(accelerators) <= REGISTRY_ACCELERATORS


def test_license_is_an_spdx_expression():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"


def test_required_comfyui_version_is_the_readme_one():
    required = PYPROJECT["tool"]["comfy"]["requires-comfyui"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", required)
    assert f"Needs ComfyUI {required.removeprefix('>=')} or newer" in (REPO_ROOT / "README.md").read_text()


def test_icon_is_a_small_png_of_this_repository():
    """The registry shows the Icon URL; it points at the file on the repository's main branch."""
    comfy = PYPROJECT["tool"]["comfy"]
    repository = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert comfy["Icon"].startswith(prefix)
    icon = REPO_ROOT / comfy["Icon"].removeprefix(prefix)
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and icon.stat().st_size <= 20_000


def test_tests_and_benchmarks_stay_out_of_the_published_archive():
    lines = (REPO_ROOT / ".comfyignore").read_text().splitlines()
    patterns = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    assert {"tests/", "bench/"} <= patterns
