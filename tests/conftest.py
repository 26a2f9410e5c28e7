"""Shared test setup: the repository root on sys.path, tiny configs, and the paths of the shared test data.

The shared data (golden vectors, CIFAR-10, the ImageNet sample) is read from environment variables (one per item, or
EXTREMA_SHARED_DIR for the folder holding all of them), defaulting to the `../shared` folder beside the repository;
tests that need it skip with a message when it is absent.
"""

import os
import sys
from pathlib import Path

# Spinning OpenMP threads make CPU runs slow and erratic on a machine shared with other jobs (docs/performance.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
SHARED = Path(os.environ.get("EXTREMA_SHARED_DIR", REPO_ROOT.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(env_var: str, default: Path) -> Path:
    """A path to shared test data from `env_var`, else `default`; skips the test when it does not exist."""
    path = Path(os.environ.get(env_var, default))
    if not path.exists():
        pytest.skip(f"{path} not found; set {env_var} to run this test")
    return path


@pytest.fixture
def golden_path() -> Path:
    return shared_path("EXTREMA_GOLDEN", SHARED / "golden" / "official_extrema_tiny.pt")


@pytest.fixture
def golden_train_path() -> Path:
    return shared_path("EXTREMA_GOLDEN_TRAIN", SHARED / "golden" / "official_extrema_train_shared.pt")


@pytest.fixture
def cifar10_dir() -> Path:
    return shared_path("EXTREMA_CIFAR10_DIR", SHARED / "data" / "cifar10")


@pytest.fixture
def imagenet_sample_dir() -> Path:
    return shared_path("EXTREMA_IMAGENET_SAMPLE_DIR", SHARED / "data" / "imagenet-sample")


@pytest.fixture
def tiny_config():
    from configuration_extrema import ExtremaConfig

    # 32 px, patch 8 -> 16 patches; narrow everything so each test runs in well under a second
    return ExtremaConfig.from_preset(
        "tiny",
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        projector_hidden_size=64,
        projection_dim=16,
        predictor_hidden_size=64,
        mask_ratio=0.75,
        num_masks=2,
    )


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Every test gets its own accelerate state: it is process-wide, and a run in bf16 (what --mixed_precision auto
    picks on CPUs with bf16 dot products) would otherwise refuse a later float32 run in the same pytest process."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def pytest_configure(config):
    # the markers of transformers' common model tests (tests/test_transformers_common.py), which transformers' own
    # conftest registers
    for marker in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test",
                   "slow"):  # fmt: skip
        config.addinivalue_line("markers", f"{marker}: a test of transformers' common model tests")
