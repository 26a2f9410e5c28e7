"""Run a Python snippet the way a user without this project would: no PYTHONPATH, another working directory, a fresh
module cache, and the project's modules unimportable even though the repository is installed (editable) here."""

import os
import subprocess
import sys
import textwrap

PROJECT_MODULES = (
    "cli_extrema", "configuration_extrema", "modeling_extrema", "data_extrema", "eval_extrema", "export_extrema",
    "train_extrema",
)  # fmt: skip

# A meta-path finder placed first refuses the project's top-level modules, whatever installed them (an editable
# install's finder, a .pth file, the working directory). Remote code loads as `transformers_modules.<...>` and passes.
BLOCKER = f"""
import importlib.abc, sys
class _NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in {PROJECT_MODULES!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked: this process plays a user without the project")
        return None
sys.meta_path.insert(0, _NoProject())
try:
    import modeling_extrema
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the project is importable in the isolated process")
"""


def run_isolated(script: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter as above; returns the completed process (check returncode, stderr)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HOME"] = str(os.path.join(cwd, "hf_home"))  # a fresh remote-code module cache
    env["HF_HUB_OFFLINE"] = "1"
    code = BLOCKER + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
