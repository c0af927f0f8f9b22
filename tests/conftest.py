"""Test-wide settings: never touch the network; keep MLflow stores under the test's own folders."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_sd.py is shared by several test files


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """A tiny phantom MIMIC-CXR-JPG tree with MS-CXR boxes (16 subjects, 32 px; shared by the CXR tests, read-only)."""
    from foba_med.phantom import write_phantom_mimic

    return write_phantom_mimic(tmp_path_factory.mktemp("cxr") / "mimic", n_subjects=16, seed=5, size=32)
