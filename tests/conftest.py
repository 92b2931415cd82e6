"""Fixtures shared by several test files."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke preset run once, uninterrupted, for the whole session. Tests copy it before changing
    anything."""
    import bootstrap as B
    root = tmp_path_factory.mktemp("runs")
    return B.run_pipeline(B.PRESETS["smoke"], root=root, name="s", gate=False)
