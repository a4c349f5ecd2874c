"""The package as pip sees it: one version everywhere, the commands, declared dependencies,
and defaults that live only in settings.py."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import wyoming_kyutai
from tests.audio_gen import speechlike, write_wav
from wyoming_kyutai.app import server_limits
from wyoming_kyutai.endpointing import EndOfTurnSettings, TurnPolicy, turn_policy
from wyoming_kyutai.framing import FrameLimits
from wyoming_kyutai.handler import HandlerSettings
from wyoming_kyutai.server import ServerLimits
from wyoming_kyutai.settings import DEFAULTS, build_settings

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
SCRIPTS: dict[str, str] = PROJECT["scripts"]


def test_one_version_everywhere() -> None:
    version = PROJECT["version"]
    assert importlib.metadata.version("wyoming_kyutai") == version
    assert wyoming_kyutai.__version__ == version
    addon = yaml.safe_load((ROOT / "addon/kyutai_stt/config.yaml").read_text(encoding="utf-8"))
    assert addon["version"] == version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    # the newest version's entry comes first, after what is not released yet, if anything
    headings = re.findall(r"^## (.+)$", changelog, re.MULTILINE)
    released = headings[1:] if headings[:1] == ["Unreleased"] else headings
    assert released[:1] == [version] and "Unreleased" not in released
    # the add-on shows the project's changelog, not a copy of it
    addon_changelog = ROOT / "addon/kyutai_stt/CHANGELOG.md"
    assert addon_changelog.is_symlink()
    assert addon_changelog.resolve() == (ROOT / "CHANGELOG.md").resolve()


def test_the_commands() -> None:
    assert set(SCRIPTS) == {
        "wyoming-kyutai",
        "wyoming-kyutai-client",
        "wyoming-kyutai-transcribe",
        "wyoming-kyutai-checkpoint",
        "wyoming-kyutai-health",
    }
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in SCRIPTS:
        assert f"`{name}" in readme, f"{name} is not in the README"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_prints_the_version(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module_name, _, function = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module_name), function)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == wyoming_kyutai.__version__


def test_python_dash_m_keeps_working() -> None:
    for module in ("wyoming_kyutai", "wyoming_kyutai.health"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--version"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == wyoming_kyutai.__version__


def _readme_commands() -> list[list[str]]:
    """Every command the README names, as argv: the console scripts (``wyoming-kyutai...``,
    installed beside this Python) and the ``python -m`` forms of our own packages, with
    ``module[.a|.b]`` expanded to ``module``, ``module.a`` and ``module.b``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    scripts = sorted(set(re.findall(r"\bwyoming-kyutai(?:-[a-z]+)*(?![\w-])", readme)))
    modules: set[str] = set()
    for base, alternatives in re.findall(
        r"\bpython3? -m\s+([A-Za-z_][\w.]*)(?:\[([^\]\s]+)\])?", readme
    ):
        if base.split(".")[0] not in ("wyoming_kyutai", "benchmarks"):
            continue  # the standard library's (python3 -m venv)
        modules.add(base)
        modules.update(base + alt for alt in alternatives.split("|") if alternatives)
    bin_dir = Path(sys.executable).parent
    return [[str(bin_dir / name)] for name in scripts] + [
        [sys.executable, "-m", module] for module in sorted(modules)
    ]


def test_the_readme_names_the_commands_and_their_modules() -> None:
    commands = _readme_commands()
    names = {Path(c[0]).name for c in commands if len(c) == 1}
    assert names == set(SCRIPTS)  # no command named that is not installed, none left out
    modules = {c[2] for c in commands if len(c) == 3}
    # each console script also runs as python -m (its module, or the package for __main__)
    for target in SCRIPTS.values():
        module = target.partition(":")[0].removesuffix(".__main__")
        assert module in modules, f"the README does not name python -m {module}"


def test_every_command_the_readme_names_runs() -> None:
    """Each one's ``--help`` as a real subprocess (all at once, so it takes a few seconds): a
    renamed module or a script pointing at one fails here, not for a user."""
    commands = _readme_commands()
    for command in commands:
        assert Path(command[0]).is_file(), f"{command[0]} is not installed: run script/setup"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WYOMING_KYUTAI_")}
    procs = [
        (
            command,
            subprocess.Popen(
                [*command, "--help"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=env,
            ),
        )
        for command in commands
    ]
    failed = []
    try:
        for command, proc in procs:
            out, err = proc.communicate(timeout=120)
            if proc.returncode != 0 or not out.startswith("usage: "):
                shown = " ".join([Path(command[0]).name, *command[1:]])
                failed.append(f"{shown} --help: exit {proc.returncode}: {(err or out)[-500:]}")
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failed, "\n".join(failed)


def _imported_distributions() -> set[str]:
    """Distributions (lower case) of the third-party modules the package imports."""
    names: set[str] = set()
    for path in (ROOT / "wyoming_kyutai").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {"wyoming_kyutai"} | set(sys.stdlib_module_names) | {"__future__"}
    mapping = importlib.metadata.packages_distributions()
    found: set[str] = set()
    for name in names - local:
        dists = mapping.get(name)
        assert dists, f"{name} is imported but belongs to no installed distribution"
        found.update(d.lower().replace("_", "-") for d in dists)
    return found


def _declared() -> set[str]:
    specs = list(PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        specs += extra
    return {re.split(r"[<>=!~\[ ;]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_imported_distribution_is_declared() -> None:
    """What the code imports is in pyproject.toml; moshi is the one known exception
    (installed with --no-deps, see the comment there), and torch is declared."""
    missing = _imported_distributions() - _declared()
    assert missing == {"moshi"}
    assert "torch" in _declared()


def test_no_requirements_files_repeat_the_dependencies() -> None:
    assert not list(ROOT.glob("requirements*.txt"))
    setup = (ROOT / "script/setup").read_text(encoding="utf-8")
    assert '-e ".[$extras]"' in setup and '--no-deps "$MOSHI_SPEC"' in setup


def test_defaults_live_only_in_settings() -> None:
    """Every dataclass built from the default settings equals its own defaults, so no module
    keeps a default of its own."""
    settings = build_settings()
    assert server_limits(settings) == ServerLimits()
    assert server_limits(settings).frames == FrameLimits()
    policy = turn_policy(settings, num_vad_heads=4)
    assert policy == TurnPolicy() and policy.end_of_turn == EndOfTurnSettings()
    assert HandlerSettings() == HandlerSettings(slot_wait=settings.slot_wait, turn=policy)
    from wyoming_kyutai import client, health, model_loading

    assert DEFAULTS["model"] == model_loading.DEFAULT_MODEL
    assert DEFAULTS["uri"] == health.DEFAULT_URI
    assert client.main.__module__ == "wyoming_kyutai.client"


def test_no_module_repeats_a_default_model_or_uri() -> None:
    for path in (ROOT / "wyoming_kyutai").rglob("*.py"):
        if path.name == "settings.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert '"kyutai/stt-1b-en_fr-candle"' not in text, path.name
        assert '"tcp://127.0.0.1:10300"' not in text, path.name


def test_the_cpu_server_path_runs_without_moshi(tiny_dir: Path, tmp_path: Path) -> None:
    """With moshi unimportable, the transcribe command (the server's model, engine and
    end-of-turn path) transcribes on the lean runtime; runtime moshi says what to install."""
    wav = tmp_path / "a.wav"
    write_wav(wav, speechlike(1.5, 16000, seed=3), 16000)
    hide = "import sys; sys.modules['moshi'] = None; import runpy; "
    for extra, code_expected in (([], 0), (["--runtime", "moshi"], 1)):
        args = ["--model", str(tiny_dir), "--json", *extra, str(wav)]
        code = f"{hide} sys.argv = ['x', *{args!r}]; "
        code += "runpy.run_module('wyoming_kyutai.transcribe', run_name='__main__')"
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == code_expected, proc.stderr
        if code_expected == 0:
            record = json.loads(proc.stdout)
            assert record["steps"], record
        else:
            assert proc.stderr.strip() == (
                "error: runtime moshi needs the 'moshi' package; install it with: "
                "pip install 'wyoming_kyutai[moshi]' && pip install --no-deps moshi==0.2.13"
            )
