"""Every command in the README and in docs/ runs as written: its flags parse with the real parsers.

The shell blocks (```bash) of README.md and docs/*.md are read as a shell would split them (line continuations,
comments, `&&`, `;`, `&`, a `for` loop's variable). A `python <script>` or `accelerate launch ... <script>` command has
its script's flags parsed by the script's own parser (`build_parser()`, else `parse_args(argv)`), and accelerate's by
accelerate's, so a renamed or misspelt flag fails here. Relative links of the pages must point to files that exist.
"""

import importlib
import re
import shlex
import sys

import pytest
from accelerate.commands.launch import launch_command_parser

from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", ";", "&", "|", "do", "then", "done", "fi", "wait"}
SCRIPT_FOLDERS = ("scripts", "benchmarks")


def shell_blocks(page) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.DOTALL)


def commands(block: str):
    """The simple commands of a shell block, as token lists, with a `for` loop's variable set to its first value and
    any other `$VARIABLE` to 0."""
    variables = {}
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.wordchars += "$/.,-=:~+*@%{}[]()"
        command = []
        for token in [*lexer, ";"]:
            if token not in SEPARATORS:
                command.append(token)
            elif command and command[0] == "for" and len(command) > 3:  # for NAME in VALUE ...
                variables[command[1]], command = command[3], []
            elif command:
                yield [re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], "0"), part) for part in command]
                command = []


def script_argv(command: list[str]):
    """(script path, its flags) of a command that runs one of the project's scripts, else None."""
    while command and re.fullmatch(r"\w+=.*", command[0]):  # VAR=value command ...
        command = command[1:]
    if len(command) >= 2 and command[0] in ("python", "python3") and command[1].endswith(".py"):
        return command[1], command[2:]
    if command[:2] == ["accelerate", "launch"]:
        launched = launch_command_parser().parse_args(command[2:])  # accelerate's own flags, checked
        return launched.training_script, launched.training_script_args
    if len(command) >= 2 and command[0] == "bash" and command[1].endswith(".sh"):
        return command[1], None
    return None


def documented_commands():
    for page in PAGES:
        for block in shell_blocks(page):
            for command in commands(block):
                found = script_argv(command)
                if found:
                    yield pytest.param(*found, id=f"{page.name}: {' '.join(command)[:80]}")


def load_script(path: str):
    folder = (REPO_ROOT / path).parent
    for name in SCRIPT_FOLDERS:  # the scripts import their siblings (`_eval_common`, `ablate`)
        if str(REPO_ROOT / name) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT / name))
    assert folder == REPO_ROOT or folder.name in SCRIPT_FOLDERS, f"{path}: not one of the project's scripts"
    return importlib.import_module((REPO_ROOT / path).stem)


@pytest.mark.parametrize("script, argv", list(documented_commands()))
def test_documented_command_parses(script, argv, tmp_path, monkeypatch, capsys):
    assert (REPO_ROOT / script).is_file(), f"{script} does not exist"
    if argv is None:  # a shell script: it exists
        return
    module = load_script(script)
    monkeypatch.chdir(tmp_path)  # a parser that creates --output_dir creates it here
    try:
        if hasattr(module, "build_parser"):
            module.build_parser().parse_args(argv)
        else:
            assert hasattr(module, "parse_args"), f"{script} has neither build_parser() nor parse_args(argv)"
            module.parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"{script} {' '.join(argv)}: {capsys.readouterr().err.strip()} (exit {error.code})")


def test_the_pages_have_commands_to_check():
    scripts = {script for param in documented_commands() for script in [param.values[0]]}
    assert {"train_extrema.py", "scripts/convert_official_checkpoint.py", "benchmarks/ablate.py"} <= scripts


def test_the_command_parser_splits_like_a_shell():
    block = 'for v in "0.5 x 1" "0.9 x 1"; do  # each\n  python benchmarks/ablate.py --variants "$v" \\\n    --a 1 &\n'
    block += "done; wait\n"
    assert list(commands(block)) == [["python", "benchmarks/ablate.py", "--variants", "0.5 x 1", "--a", "1"]]
    assert script_argv(["DATA=x", "bash", "benchmarks/gpu_quality.sh"]) == ("benchmarks/gpu_quality.sh", None)


def anchors(page) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL),
                          flags=re.MULTILINE)  # fmt: skip
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_point_to_files_and_headings(page):
    text = page.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if "://" in target:
            continue
        linked = (page.parent / target) if target else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name} links to {target}#{anchor}, which is not a heading there"


def test_the_readme_test_command_is_what_ci_runs():
    command = "python -m pytest tests -x -q"
    assert command in (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert command in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_is_short():
    assert len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
