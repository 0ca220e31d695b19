"""The README and the documentation site in docs/: the site builds without a warning, every
link holds, and every command shown in a ``bash`` block is one that works as written.

A command is checked as far as it can be without running a training or a benchmark: our four
commands' arguments go through their real parsers (a renamed option, subcommand or scorer
fails), each subcommand's ``--help`` runs, scripts' arguments go through the script's own
parser (stopped right after parsing), ``make`` targets and variables must be in the Makefile,
and paths into the repository or the shared data must exist. A command the checker does not
know fails the test, so a page never shows a command nobody checks.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPOSITORY, SHARED_DATA

DOCS = REPOSITORY / "docs"
# The folders a documented relative path may point into; anything else (map.nii.gz, runs/…,
# cohort.csv) is a file the reader makes or brings.
REPOSITORY_FOLDERS = ("training/", "benchmarks/", "scripts/", "docs/", "src/", "tests/")
SHELL_LANGUAGES = ("bash", "console", "shell", "sh")


# ------------------------------------------------------------------ collecting the commands


@dataclass(frozen=True)
class Command:
    page: str     # the file it is shown in, relative to the repository
    line: int     # the line its block starts on
    text: str     # as shown, continuation lines joined

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


_FENCE = re.compile(r"^(?P<indent> *)```(?P<language>[\w{}-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
_INCLUDE = re.compile(r"^```\{include\}\s+(\S+)", re.M)


def documented_files() -> list[Path]:
    """The README, the site's pages, and the files those pages include."""
    pages = sorted(DOCS.glob("*.md"))
    included = [(page.parent / target).resolve() for page in pages for target in _INCLUDE.findall(page.read_text())]
    return [REPOSITORY / "README.md", *pages, *dict.fromkeys(included)]


def shell_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, body) of every fenced block in a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, match.start()) + 1, match["language"], match["body"])
            for match in _FENCE.finditer(text)]


def commands_in(path: Path) -> list[Command]:
    commands = []
    for line, language, body in shell_blocks(path):
        if language not in SHELL_LANGUAGES:
            continue
        body = re.sub(r"\\\n\s*", " ", body)  # continuation lines
        for text in body.splitlines():
            text = text.strip()
            if language == "console":  # prompts are commands, the rest is their output
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            if text and not text.startswith("#"):
                page = path.relative_to(REPOSITORY) if path.is_relative_to(REPOSITORY) else path.name
                commands.append(Command(str(page), line, text))
    return commands


def all_commands() -> list[Command]:
    return [command for path in documented_files() for command in commands_in(path)]


# ------------------------------------------------------------------ checking one command


class ParsedArguments(Exception):
    """Raised by the patched parse_args: the script's arguments parsed, nothing else run."""


def _parse_only(run, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run a script's entry point up to its argument parsing, with ``argv`` as its arguments."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise ParsedArguments(original(self, argv if args is None else args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        patch.setattr(sys, "argv", ["script", *argv])
        try:
            run()
        except ParsedArguments as parsed:
            return parsed.args[0]
    raise AssertionError("the script ended without parsing its arguments")


def _parse(parser: argparse.ArgumentParser, argv: list[str], command: Command) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as stop:  # argparse's usage error: its message is on stderr
        raise AssertionError(f"{command}\n  is refused by {parser.prog}'s parser (exit {stop.code})") from None


def _our_parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    from brain_uad_training import calibrate as training_calibrate
    from brain_uad_training import cli as training_cli

    from napari_brain_uad import cli, sample_registry

    return {"brain-uad": cli.build_parser, "brain-uad-sample": sample_registry.build_parser,
            "brain-uad-train": training_cli.build_parser, "brain-uad-calibrate": training_calibrate.build_parser}


class CommandChecker:
    """Checks commands one by one, remembering what earlier ones made (a model name registered
    with ``brain-uad calibrate --name``) and which subcommands were used."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.parsers = _our_parsers()
        self.registered_models: set[str] = set()
        self.subcommands_used: set[tuple[str, str | None]] = set()
        self.makefile = (REPOSITORY / "Makefile").read_text()

    def check(self, command: Command) -> str:
        """Check one command; returns what it was recognised as."""
        words = shlex.split(command.text, comments=True)
        kinds = []
        while words:
            if "&&" in words:
                cut = words.index("&&")
                part, words = words[:cut], words[cut + 1:]
            else:
                part, words = words, []
            kinds.append(self._check_simple(part, command))
        return " && ".join(kinds)

    def _check_simple(self, words: list[str], command: Command) -> str:
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # environment settings
            self._check_path(words.pop(0).split("=", 1)[1], command)
        if words[:1] == ["xvfb-run"]:
            words = [word for word in words[1:] if word != "-a"]
        assert words, f"{command}\n  holds nothing to run"
        # `.venv/bin/brain-uad` (the repository's set-up) and `brain-uad` (an installed package) alike
        program = Path(words[0]).name if words[0].startswith(".venv/bin/") else words[0]
        arguments = words[1:]
        if program in self.parsers:
            return self._check_ours(program, arguments, command)
        if program == "torchrun":
            module = arguments.index("-m")
            _parse(_torchrun_parser(), arguments[:module], command)
            target = {"napari_brain_uad.cli": "brain-uad", "brain_uad_training": "brain-uad-train"}
            assert arguments[module + 1] in target, f"{command}\n  runs an unknown module under torchrun"
            return self._check_ours(target[arguments[module + 1]], arguments[module + 2:], command)
        if program == "python":
            return self._check_python(arguments, command)
        if program == "make":
            return self._check_make(arguments, command)
        if program == "npe2":
            assert arguments[:1] == ["validate"] and arguments[1:] == [_manifest_name()], command
            return "npe2 validate"
        if program == "pip":
            return self._check_pip(arguments, command)
        if program == "export":
            for assignment in arguments:
                name, _, value = assignment.partition("=")
                assert name in _plugin_variables(), f"{command}\n  sets {name}, which the plugin does not read"
                self._check_path(value, command)
            return "export"
        raise AssertionError(f"{command}\n  is a command the documentation test does not know how to check")

    def _check_ours(self, program: str, arguments: list[str], command: Command) -> str:
        parsed = _parse(self.parsers[program](), arguments, command)
        subcommand = getattr(parsed, "command", None)
        self.subcommands_used.add((program, subcommand))
        scorer = getattr(parsed, "scorer", None)
        if scorer is not None:
            from napari_brain_uad.scoring import SCORERS

            assert scorer in SCORERS, f"{command}\n  names the scorer {scorer!r}, which is not registered"
        model = getattr(parsed, "model", None)
        if isinstance(model, str) and not ("/" in model or model.endswith(".safetensors")):
            from napari_brain_uad.model_registry import registry

            known = set(registry()["models"]) | self.registered_models
            assert model in known, f"{command}\n  names the model {model!r}, which no registry holds"
        if getattr(parsed, "name", None) and subcommand == "calibrate":
            self.registered_models.add(parsed.name)
        for value in arguments:
            self._check_path(value, command)
        return f"{program} {subcommand or ''}".strip()

    def _check_python(self, arguments: list[str], command: Command) -> str:
        if arguments[:2] == ["-m", "pytest"]:
            for path in arguments[2:]:
                if not path.startswith("-"):
                    assert (REPOSITORY / path.split("::")[0]).exists(), f"{command}\n  names a missing {path}"
            return "pytest"
        script = arguments[0]
        assert script.endswith(".py") and script.startswith(("benchmarks/", "scripts/")), \
            f"{command}\n  runs a Python file the test does not know: {script}"
        path = REPOSITORY / script
        assert path.is_file(), f"{command}\n  names a missing script {script}"
        try:
            _parse_only(lambda: runpy.run_path(str(path), run_name="__main__"), arguments[1:], self.monkeypatch)
        except SystemExit as stop:
            raise AssertionError(f"{command}\n  is refused by {script}'s parser (exit {stop.code})") from None
        for value in arguments[1:]:
            self._check_path(value, command)
        return f"python {script}"

    def _check_make(self, arguments: list[str], command: Command) -> str:
        targets = [word for word in arguments if "=" not in word]
        assert targets, f"{command}\n  names no make target"
        for target in targets:
            assert re.search(rf"^{re.escape(target)}:", self.makefile, re.M), \
                f"{command}\n  names the make target {target!r}, which the Makefile lacks"
        for setting in (word for word in arguments if "=" in word):
            name, value = setting.split("=", 1)
            assert re.search(rf"^{re.escape(name)} \?=", self.makefile, re.M), \
                f"{command}\n  sets {name}, which the Makefile does not read"
            if name == "SAMPLE":
                from napari_brain_uad.sample_registry import sample_names

                assert value in sample_names(), f"{command}\n  names the sample {value!r}, which is not registered"
        return "make " + " ".join(targets)

    def _check_pip(self, arguments: list[str], command: Command) -> str:
        import tomllib

        project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
        assert arguments[:1] == ["install"], command
        for requirement in arguments[1:]:
            match = re.fullmatch(r"([\w-]+)(?:\[([\w,]+)\])?", requirement)
            assert match and match[1] == project["name"], f"{command}\n  installs something other than this package"
            for extra in (match[2] or "").split(","):
                assert not extra or extra in project["optional-dependencies"], f"{command}\n  names a missing extra {extra}"
        return "pip install"

    def _check_path(self, value: str, command: Command) -> None:
        if "*" in value or "…" in value:
            return
        if value.startswith(REPOSITORY_FOLDERS):
            assert (REPOSITORY / value).exists(), f"{command}\n  names {value}, which is not in the repository"
        elif value.startswith("../shared/data/") and (SHARED_DATA / "README.md").is_file():
            assert (SHARED_DATA / value.removeprefix("../shared/data/")).exists(), \
                f"{command}\n  names {value}, which the shared data lacks"

    def check_every_help(self) -> None:
        """``--help`` of every command and subcommand the documentation uses."""
        for program, subcommand in sorted(self.subcommands_used, key=str):
            arguments = [subcommand, "--help"] if subcommand else ["--help"]
            with pytest.raises(SystemExit) as stop:
                self.parsers[program]().parse_args(arguments)
            assert stop.value.code == 0, f"{program} {' '.join(arguments)} failed"


def _torchrun_parser() -> argparse.ArgumentParser:
    """The launcher options the pages use (torchrun's own parser takes the rest of the line)."""
    parser = argparse.ArgumentParser(prog="torchrun")
    for option in ("--nproc_per_node", "--nproc-per-node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint"):
        parser.add_argument(option)
    return parser


def _plugin_variables() -> set[str]:
    """The environment variables the package reads (named in its source as NAPARI_BRAIN_UAD_...)."""
    source = REPOSITORY / "src" / "napari_brain_uad"
    return {name for path in source.rglob("*.py") for name in re.findall(r"NAPARI_BRAIN_UAD_[A-Z_]+", path.read_text())}


def _manifest_name() -> str:
    manifest = (REPOSITORY / "src/napari_brain_uad/napari.yaml").read_text()
    return re.search(r"^name: (\S+)", manifest, re.M)[1]


# ------------------------------------------------------------------ the tests


def test_the_collector_finds_the_commands_of_every_page():
    commands = all_commands()
    pages = {command.page for command in commands}
    # The README's two commands and quick start, and the pages that show commands.
    assert {"README.md", "docs/command-line.md", "docs/training.md", "docs/models.md", "docs/development.md",
            "docs/data.md", "docs/reading-scans.md", "training/README.md"} <= pages
    assert len(commands) >= 50
    readme = [command.text for command in commands if command.page == "README.md"]
    assert readme[:2] == ["make napari", "make test"]  # the two commands, first
    # Every shell block of a page holds at least one command the collector sees: a block
    # written in another way (a prompt without "$ ") would be skipped silently otherwise.
    for path in documented_files():
        for line, language, body in shell_blocks(path):
            if language in SHELL_LANGUAGES:
                assert any(command.line == line for command in commands_in(path)), f"{path}:{line}: no command found"
            else:  # a block that looks like shell but is not marked as such escapes the check
                assert not re.match(r"\s*(\.venv/bin/|brain-uad|make |torchrun )", body), \
                    f"{path}:{line}: a command in a ```{language} block; mark it ```bash"


def test_every_documented_command_works_as_written(monkeypatch):
    checker = CommandChecker(monkeypatch)
    recognised = {str(command): checker.check(command) for command in all_commands()}
    assert {kind.split()[0] for kind in recognised.values()} >= {
        "brain-uad", "brain-uad-sample", "brain-uad-train", "brain-uad-calibrate", "make", "python", "pytest"}
    checker.check_every_help()
    assert {("brain-uad", "score"), ("brain-uad", "evaluate"), ("brain-uad", "calibrate"),
            ("brain-uad", "models")} <= checker.subcommands_used


@pytest.mark.parametrize("bad_line, problem", [
    (".venv/bin/brain-uad score SCAN.nii.gz --out-map map.nii.gz --no-such-option", "refused by brain-uad"),
    ("brain-uad scour SCAN.nii.gz", "refused by brain-uad"),
    ("brain-uad score SCAN.nii.gz --scorer no-such-scorer --out-map m.nii.gz", "not registered"),
    ("brain-uad score SCAN.nii.gz --model no-such-model --out-map m.nii.gz", "no registry holds"),
    ("brain-uad-train --config training/configs/no-such.toml --output runs/x", "not in the repository"),
    ("brain-uad-train --config training/configs/ixi-t1-dae-cpu.toml --stepz 3", "refused by brain-uad-train"),
    ("make no-such-target", "Makefile lacks"),
    ("make napari SAMPLE=no-such-sample", "not registered"),
    (".venv/bin/python benchmarks/bench_real_lesions.py --no-such-option", "refused by benchmarks/bench_real_lesions.py"),
    ("rm -rf build", "does not know"),
])
def test_a_wrong_command_fails_the_check(monkeypatch, bad_line, problem):
    """The checker is not a test that cannot fail: each of these wrong commands is caught."""
    with pytest.raises(AssertionError, match=problem):
        CommandChecker(monkeypatch).check(Command("docs/example.md", 1, bad_line))


def test_a_console_block_is_read_by_its_prompts(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```console\n$ brain-uad models\n{\"models\": 7}\n```\n")
    assert [command.text for command in commands_in(page)] == ["brain-uad models"]


def test_the_readme_quick_start_scans_are_the_ones_test_cli_runs():
    """The README's `brain-uad score` quick start on the shared data is run, with these very
    options, by tests/core/test_cli.py (the bundled default model on MSLUB patient 26's T1, and
    the raw clinical T1 with its brain extracted); here it is only parsed, so the suite does not
    run the same scans twice."""
    from napari_brain_uad.sample_registry import sample_files

    test_cli = (REPOSITORY / "tests/core/test_cli.py").read_text()
    fetched = re.compile(r"\$\(\S*brain-uad-sample (\S+) --first\)")  # a sample's scan, as a newcomer gets it
    quick_start = [command for command in all_commands()
                   if command.page == "README.md" and " score " in command.text
                   and (" score ../shared/data/" in command.text or fetched.search(command.text))]
    assert len(quick_start) == 2
    for command in quick_start:
        sample = fetched.search(command.text)
        words = shlex.split(command.text.replace(sample.group(0), "SAMPLE") if sample else command.text, comments=True)
        scan = sample_files(sample.group(1))[0]["file"] if sample else \
            next(word for word in words if word.startswith("../shared/data/")).removeprefix("../shared/data/")
        assert f'"{scan}"' in test_cli, f"test_cli.py does not run {scan}"
        for option in (word for word in words if word.startswith("--")):
            assert f'"{option}"' in test_cli, f"test_cli.py never passes {option}"


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    """The site built as `make docs` builds it: warnings (broken links, missing pages, unknown
    cross-references) are errors."""
    output = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", "-q",
                             str(DOCS), str(output)], capture_output=True, text=True, cwd=REPOSITORY)
    # Without the dev extra (sphinx, myst-parser) this fails too, saying so: `make test` installs it.
    assert result.returncode == 0, f"the documentation site does not build cleanly:\n{result.stderr}"
    return output


def test_the_site_builds_without_warnings(built_site):
    pages = {path.stem for path in DOCS.glob("*.md")}
    assert pages <= {path.stem for path in built_site.glob("*.html")}
    assert (built_site / "review_findings.png").is_file() or (built_site / "_images/review_findings.png").is_file()


def test_the_readme_links_hold(built_site):
    """GitHub shows the README, not Sphinx, so its links are checked here: files exist, and an
    anchor into a page is an id of that page as built."""
    readme = (REPOSITORY / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert len(links) >= 10
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        assert (REPOSITORY / target).exists(), f"README.md links to a missing {target}"
        if anchor:
            html = (built_site / Path(target).relative_to("docs").with_suffix(".html")).read_text()
            assert f'id="{anchor}"' in html, f"README.md links to {link}, an anchor the page lacks"


def test_the_readme_stays_short():
    assert len((REPOSITORY / "README.md").read_text().splitlines()) < 200
