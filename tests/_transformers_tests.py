"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`), fetched at test
time from the source distribution of the INSTALLED transformers version; nothing of them is copied into this repository.

`pip download --no-binary :all: --no-deps transformers==<installed>` fetches the sdist (from the configured index or
mirror) once; its top-level `tests/*.py` are extracted into a cache (`EXTREMA_TEST_CACHE`, default
`~/.cache/extrema-tests`) and imported as the package `transformers_upstream_tests`. `load()` returns that package, or
None with the reason when the sdist cannot be had (offline without a cache, no pip).

The sdist ships only the top-level test files, not the folders they import three helpers from. Where those are
missing, stand-ins take their place, each one doing what the common tests need of it here:
- `exporters.test_export.ExportTesterMixin` (the base of `ModelTesterMixin`; it adds torch.export tests): an empty
  mixin. The export of the backbone has its own test (tests/test_export.py).
- `generation.test_utils.GenerationTesterMixin`: an empty class (no ExtreMA model generates).
- `utils.test_configuration_utils.config_common_kwargs`: `PreTrainedConfig` keyword arguments with non-default
  values, which `ConfigTester.check_config_arguments_init` checks every config keeps.
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers
from filelock import FileLock

PACKAGE = "transformers_upstream_tests"
CACHE = Path(os.environ.get("EXTREMA_TEST_CACHE", Path.home() / ".cache" / "extrema-tests"))

CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "architectures": ["ExtremaModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "chunk_size_feed_forward": 5,
}


def _fetch(version: str, target: Path) -> None:
    """Download the sdist of transformers `version` and extract its top-level tests/*.py into `target`."""
    with tempfile.TemporaryDirectory() as download_dir:
        # bounded waits: offline, pip would otherwise retry for minutes before the module can skip
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet"]
        command += ["--retries", "1", "--timeout", "30"]
        command += [f"transformers=={version}", "-d", download_dir]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
        (sdist,) = Path(download_dir).glob("transformers-*.tar.gz")
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts  # ("transformers-X", "tests", "name.py")
                if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    (partial / parts[2]).write_bytes(archive.extractfile(member).read())
        # test_configuration_common runs `direct_transformers_import(<its folder>)`, which executes the folder's
        # __init__.py (empty in transformers' repository, absent from the sdist)
        (partial / "__init__.py").touch()
        partial.rename(target)


def _stand_in(name: str, **attributes) -> None:
    """Register module `PACKAGE.name` (and its parent packages) holding `attributes`, unless a real one exists."""
    full_name = f"{PACKAGE}.{name}"
    try:
        importlib.import_module(full_name)
        return
    except ImportError:
        pass
    parent = PACKAGE
    for part in name.split(".")[:-1]:
        parent = f"{parent}.{part}"
        if parent not in sys.modules:
            package = types.ModuleType(parent)
            package.__path__ = []
            sys.modules[parent] = package
    module = types.ModuleType(full_name)
    module.__dict__.update(attributes)
    sys.modules[full_name] = module


def load():
    """(package, None) with the upstream test modules importable from `package`, or (None, reason)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE], None
    version = transformers.__version__
    target = CACHE / f"transformers-{version}" / "tests"
    try:
        if not (target / "__init__.py").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target.parent / ".lock")):
                if not (target / "__init__.py").exists():
                    _fetch(version, target)
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        detail = (str(getattr(error, "stderr", None) or error).strip().splitlines() or ["no message"])[-1]
        return None, f"transformers {version} source distribution unavailable (pip download: {detail[-300:]})"

    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(target)]
    sys.modules[PACKAGE] = package
    _stand_in("exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
    _stand_in("generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
    _stand_in("utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    try:
        for name in ("test_modeling_common", "test_configuration_common", "test_backbone_common"):
            importlib.import_module(f"{PACKAGE}.{name}")
    except ImportError as error:  # a package the test files import (e.g. parameterized) is missing
        for name in [name for name in sys.modules if name.startswith(PACKAGE)]:
            del sys.modules[name]
        return None, f"transformers' common tests cannot be imported: {error}"
    return package, None
