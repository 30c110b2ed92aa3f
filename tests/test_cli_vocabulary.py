"""One CLI vocabulary and one CLI tail (export/core/cli.py): each flag means one thing in every command, the
old spellings still parse (hidden from -h), errors exit 2 with one `error:` message, and the console scripts
of pyproject.toml reach the same mains as the `python -m` forms. Parsing only: nothing here runs a model."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from export.core import cli
from export.core.errors import MvtError, OptionError
from export.models.testing import load_script

ROOT = Path(__file__).resolve().parents[1]


def _parser(name: str) -> argparse.ArgumentParser:
    """The parser of a CLI: a module's parser(), or a script's."""
    if name.startswith("scripts/"):
        return load_script(name.removeprefix("scripts/")).parser()
    return importlib.import_module(name).parser()


# every CLI with a parser(), and the arguments its parser requires
CLIS = {
    "export.build_engine": [],
    "triton_repo.build": ["--artifacts", "a", "--out", "r"],
    "triton_repo.serve": ["repo"],
    "embed.__main__": ["--artifacts", "a", "--images", "photos/", "--out", "o"],
    "parity_tests.ledger": ["--artifacts", "a"],
    "scripts/visualize_features": ["--artifacts", "a"],
    "scripts/load_test": [],
    "scripts/benchmark_embed": [],
    "scripts/benchmark": [],
}

# (CLI, new spelling, old spellings, a value, dest, default): the renamed flags
RENAMED = [
    ("triton_repo.build", "--served-model", ["--name"], "rice_embed", "served_model", "embed"),
    ("scripts/load_test", "--served-model", ["--model"], "rice_embed", "served_model", "embed"),
    ("scripts/visualize_features", "--served-model", ["--triton-model"], "rice_embed", "served_model", "embed"),
    ("parity_tests.ledger", "--served-model", ["--triton-model"], "rice_embed", "served_model", "embed"),
    ("scripts/visualize_features", "--runner", ["--backend"], "triton", "runner", "onnxruntime"),
    ("embed.__main__", "--runner", ["--runtime"], "onnxruntime", "runner", "auto"),
    ("scripts/benchmark_embed", "--runner", ["--runtime"], "onnxruntime", "runner", "auto"),
    ("scripts/benchmark_embed", "--image-count", ["--images"], "8", "image_count", 64),
]


def _visible(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def _hidden(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions if a.help == argparse.SUPPRESS for s in a.option_strings}


@pytest.mark.parametrize("name, new, old, value, dest, default", RENAMED)
def test_new_and_old_spellings_mean_the_same(name, new, old, value, dest, default):
    p = _parser(name)
    required = CLIS[name]
    parsed = p.parse_args([*required, new, value])
    expected = int(value) if isinstance(default, int) else value
    assert getattr(parsed, dest) == expected
    for spelling in old:
        assert getattr(p.parse_args([*required, spelling, value]), dest) == expected, spelling
    assert getattr(p.parse_args(required), dest) == default  # neither given: the new flag's default


@pytest.mark.parametrize("name, new, old, value, dest, default", RENAMED)
def test_help_lists_only_the_new_spelling(name, new, old, value, dest, default):
    p = _parser(name)
    text = p.format_help()
    assert new in text and new in _visible(p)
    for spelling in old:
        assert spelling in _hidden(p) and spelling not in _visible(p)
        # the old spelling appears nowhere as an option in -h (usage or options list)
        assert not re.search(rf"(^|[\s\[]){re.escape(spelling)}(?![\w-])", text), spelling


def test_one_meaning_per_flag_across_commands():
    visible = {name: _visible(_parser(name)) for name in CLIS}

    def having(flag: str) -> set[str]:
        return {name for name, flags in visible.items() if flag in flags}

    assert having("--runtime") == {"export.build_engine"}  # the TensorRT flavour it builds with
    assert having("--backend") == {"triton_repo.build"}  # the encoder form
    assert having("--runner") == {"embed.__main__", "scripts/visualize_features", "scripts/benchmark_embed"}
    assert having("--served-model") == {"triton_repo.build", "scripts/load_test", "scripts/visualize_features",
                                        "parity_tests.ledger"}
    assert having("--images") == {"embed.__main__"}  # a source; a count is --image-count
    assert having("--model") == {"export.build_engine", "scripts/benchmark"}  # a checkpoint
    assert not having("--name") and not having("--triton-model")


def test_build_engine_runtime_is_the_tensorrt_flavour():
    from export.engine.target import RUNTIME_CHOICES

    (action,) = [a for a in _parser("export.build_engine")._actions if "--runtime" in a.option_strings]
    assert tuple(action.choices) == RUNTIME_CHOICES and "none" in RUNTIME_CHOICES


def test_shared_flags_have_one_help_text():
    helps: dict[str, set[str]] = {}
    for name in ("triton_repo.build", "embed.__main__", "parity_tests.ledger", "scripts/visualize_features"):
        for a in _parser(name)._actions:
            if "--artifacts" in a.option_strings or "--served-model" in a.option_strings:
                helps.setdefault(a.option_strings[0], set()).add(a.help)
    assert {k: len(v) for k, v in helps.items()} == {"--artifacts": 1, "--served-model": 1}


def test_a_hidden_alias_keeps_the_flags_default_and_parsing():
    p = argparse.ArgumentParser()
    cli.add_option(p, "--new", aliases=["--old"], type=int, default=7, help="the new one")
    cli.add_option(p, "--flag", aliases=["--old-flag"], action="store_true", help="a switch")
    assert vars(p.parse_args([])) == {"new": 7, "flag": False}
    assert vars(p.parse_args(["--old", "3", "--old-flag"])) == {"new": 3, "flag": True}
    assert "--old" not in p.format_help() and "--new" in p.format_help()
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["--old", "x"])  # the old spelling is checked as the new one is
    assert exit_.value.code == cli.EXIT_BAD_INPUT


# --- one tail: run_cli and command()


def test_exit_codes_are_the_documented_ones():
    assert (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_BAD_INPUT, cli.EXIT_ENGINE_FAILED) == (0, 1, 2, 3)
    from export import build_engine

    assert (build_engine.EXIT_PARITY_FAILED, build_engine.EXIT_BAD_INPUT, build_engine.EXIT_ENGINE_FAILED) == (1, 2, 3)


def test_run_cli_turns_our_errors_into_one_message_and_exit_2(capsys):
    def main(argv=None) -> int:
        raise OptionError("--max-batch 0 must be at least 1\n  and a second line that says more")

    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(main, [])
    assert exit_.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    # the message as written (a multi-line one keeps its lines: `no --backend can serve` lists each form's reason)
    assert err == "error: --max-batch 0 must be at least 1\n  and a second line that says more\n"
    assert "Traceback" not in err


def test_run_cli_exits_with_mains_status_and_lets_bugs_through(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(lambda argv=None: cli.EXIT_FAILED)
    assert exit_.value.code == cli.EXIT_FAILED

    def buggy(argv=None) -> int:
        raise KeyError("a bug, not an input")

    with pytest.raises(KeyError):
        cli.run_cli(buggy)


def test_command_catches_the_types_it_is_given(capsys):
    @cli.command(FileNotFoundError)
    def main(argv=None) -> int:
        raise FileNotFoundError(f"no such file: {argv[0]}")

    assert main(["x.jpg"]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: no such file: x.jpg\n"
    assert cli.command()(main) is main  # decorated once: run_cli keeps its types

    @cli.command()
    def fine(argv=None) -> int:
        raise MvtError("refused")

    assert fine([]) == cli.EXIT_BAD_INPUT


def test_first_line_of_a_foreign_error():
    assert cli.first_line(RuntimeError("\n  Invalid Engine\nsecond line")) == "Invalid Engine"
    assert cli.first_line(RuntimeError("")) == ""
    assert cli.first_line(RuntimeError("x" * 50), limit=10) == "x" * 10


def test_every_cli_ends_with_run_cli():
    """The `python -m` and script forms all end with the one tail (mvt_kernels/selftest.py, below export,
    cannot import it)."""
    files = ["export/build_engine.py", "triton_repo/build.py", "triton_repo/serve.py", "triton_repo/server.py",
             "embed/__main__.py", "parity_tests/__main__.py",
             *(f"scripts/{s}.py" for s in ("benchmark", "benchmark_embed", "load_test", "visualize_features",
                                           "zoo_matrix", "gpu_check"))]
    for rel in files:
        tail = (ROOT / rel).read_text().rsplit('if __name__ == "__main__":', 1)[-1]
        assert "run_cli(" in tail and "sys.exit(main())" not in tail, rel


# --- console scripts


def _console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts] (tomllib is 3.11+; we support 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[)", text, re.M | re.S)
    assert block, "pyproject.toml has no [project.scripts]"
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', block.group(1), re.M))


def test_console_scripts_sit_beside_the_python_m_forms():
    assert _console_scripts() == {
        "mvt-build-engine": "export.build_engine:main",
        "mvt-triton-repo": "triton_repo.build:main",
        "mvt-serve": "triton_repo.serve:main",
        "mvt-parity": "parity_tests.ledger:main",
        "mvt-embed": "embed.__main__:main",
    }


@pytest.mark.parametrize("script, target", sorted(_console_scripts().items()))
def test_console_script_targets_answer_help(script, target, capsys):
    """A console script runs `sys.exit(main())`: the target takes argv=None and returns an exit status; -h
    exits 0 with the usage."""
    module, function = target.split(":")
    main = getattr(importlib.import_module(module), function)
    assert callable(main) and hasattr(main, "_cli_caught")  # command(): an MvtError exits 2, no traceback
    with pytest.raises(SystemExit) as exit_:
        main(["-h"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_no_sys_path_insert_where_the_project_is_installed():
    """scripts/ import the installed project; the Triton python backend's models (copied into a model folder)
    and gpu_check.py (a bare GPU machine) are the places it is not installed."""
    allowed = {"triton_repo/backend_models/ragged.py", "triton_repo/backend_models/preprocess.py",
               "scripts/gpu_check.py"}
    found = {str(path.relative_to(ROOT)) for top in ("export", "triton_repo", "embed", "parity_tests", "scripts",
                                                      "mvt_kernels")
             for path in (ROOT / top).rglob("*.py")
             if "sys.path.insert" in path.read_text() and "test_" not in path.name}
    assert found <= allowed, found - allowed
