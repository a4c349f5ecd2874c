"""The Home Assistant add-on and the Docker images, checked without a Docker engine.

Manifest consistency (options ↔ schema ↔ translations ↔ server settings, versions), the
options → flags mapping through the real run script and the server's own parser, the
discovery script against a fake Supervisor, and static checks of both Dockerfiles and
the .dockerignore allow-list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from wyoming.event import Event, async_read_event, async_write_event

from wyoming_kyutai.__main__ import build_parser
from wyoming_kyutai.addon_options import OPTION_SETTINGS, OptionsError, options_to_args
from wyoming_kyutai.settings import DEFAULTS, Settings, as_dict, settings_from_args

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon" / "kyutai_stt"
RUN_SCRIPT = ADDON / "rootfs" / "usr" / "local" / "bin" / "kyutai-run"
DISCOVERY_SCRIPT = ADDON / "rootfs" / "usr" / "local" / "bin" / "kyutai-discovery"
SETTING_FIELDS = {f.name: f for f in fields(Settings)}
_SCRIPTS = {
    target: name
    for name, target in tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"
    ]["scripts"].items()
}
"""Console-script entry point → command name, from pyproject.toml."""


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    data = _yaml(ADDON / "config.yaml")
    assert isinstance(data, dict)
    return data


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WYOMING_KYUTAI_")}
    env.pop("SUPERVISOR_TOKEN", None)
    env.update(extra)
    return env


def _settings_for(args: list[str]) -> dict[str, Any]:
    """What the server makes of these flags (no environment, no config file)."""
    return as_dict(settings_from_args(build_parser().parse_args(args), env={}))


# --- manifest ---------------------------------------------------------------------------


def test_manifest_basics(manifest: dict[str, Any]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert manifest["version"] == pyproject["project"]["version"]
    for key in ("name", "slug", "description", "url"):
        assert isinstance(manifest[key], str) and manifest[key]
    assert re.fullmatch(r"[a-z0-9_]+", manifest["slug"])
    assert set(manifest["arch"]) == {"amd64", "aarch64"}
    assert manifest["init"] is False
    assert manifest["discovery"] == ["wyoming"]
    assert manifest["ports"] == {"10300/tcp": None}
    # the server reads device/area names through the Supervisor's proxy (hass_names)
    assert manifest["homeassistant_api"] is True
    repository = _yaml(ROOT / "repository.yaml")
    assert repository["name"] and repository["url"]


def test_build_yaml_has_a_base_for_every_arch(manifest: dict[str, Any]) -> None:
    build = _yaml(ADDON / "build.yaml")
    assert set(build["build_from"]) == set(manifest["arch"])
    for arch, image in build["build_from"].items():
        assert image.startswith(f"ghcr.io/home-assistant/{arch}-base")
    dockerfile_args = {a.split("=")[0] for a in _instructions(ADDON / "Dockerfile", "ARG")}
    assert set(build.get("args", {})) <= dockerfile_args


def test_every_option_has_schema_translation_and_setting(manifest: dict[str, Any]) -> None:
    options, schema = manifest["options"], manifest["schema"]
    assert set(options) == set(schema)
    assert set(options) == set(OPTION_SETTINGS)
    translations = _yaml(ADDON / "translations" / "en.yaml")["configuration"]
    assert set(translations) == set(options)
    for option in options:
        assert translations[option]["name"] and translations[option]["description"]
        assert OPTION_SETTINGS[option] in SETTING_FIELDS, option
    assert _yaml(ADDON / "translations" / "en.yaml")["network"]["10300/tcp"]


def _schema_kind(rule: Any) -> tuple[str, dict[str, Any]]:
    """An add-on schema rule → (python type text, {min, max, choices})."""
    if isinstance(rule, list):
        assert rule == ["str"]
        return "list[str]", {}
    found = re.fullmatch(r"(\w+)(?:\((.*)\))?(\?)?", rule)
    assert found, rule
    kind, params = found.group(1), found.group(2)
    if kind == "list":
        return "str", {"choices": tuple(params.split("|"))}
    rules: dict[str, Any] = {}
    if params is not None:
        low, _, high = params.partition(",")
        number = int if kind == "int" else float
        if low:
            rules["min"] = number(low)
        if high:
            rules["max"] = number(high)
    return kind, rules


def test_schema_types_and_ranges_fit_the_settings(manifest: dict[str, Any]) -> None:
    for option, rule in manifest["schema"].items():
        setting = SETTING_FIELDS[OPTION_SETTINGS[option]]
        kind, rules = _schema_kind(rule)
        assert str(setting.type).replace(" ", "").removesuffix("|None") == kind, option
        meta = setting.metadata
        if "choices" in rules:
            assert set(rules["choices"]) == set(meta["choices"]), option
        if "min" in meta:
            assert rules.get("min", float("-inf")) >= meta["min"], option
        if "max" in meta:
            assert rules.get("max", float("inf")) <= meta["max"], option


def _other_value(option: str, rule: Any, default: Any) -> Any:
    kind, rules = _schema_kind(rule)
    if kind == "bool":
        return not default
    if "choices" in rules:
        return next(c for c in rules["choices"] if c != default)
    if kind == "int":
        return default + 1
    if kind == "float":
        return 0.25 if default != 0.25 else 0.75
    if kind == "list[str]":
        return ["en"]
    return "/share/models/stt-1b-en_fr-candle"


def test_every_option_changes_its_setting(manifest: dict[str, Any]) -> None:
    for option, default in manifest["options"].items():
        setting = OPTION_SETTINGS[option]
        # the add-on's default is what the server gets (empty list: the server's default)
        expected = DEFAULTS[setting] if default == [] else default
        assert _settings_for(options_to_args({option: default}))[setting] == expected
        # and another value goes through to the right setting, alone
        value = _other_value(option, manifest["schema"][option], default)
        got = _settings_for(options_to_args({option: value}))
        assert got[setting] == value, option
        changed = {k for k, v in got.items() if v != DEFAULTS[k]}
        assert changed == {setting}, option


def test_options_to_args_shapes() -> None:
    assert options_to_args({}) == []
    assert options_to_args({"end_of_turn": False, "debug_logging": True}) == [
        "--no-end-of-turn",
        "--debug",
    ]
    assert options_to_args({"languages": ["en", "fr"], "model": ""}) == ["--languages", "en,fr"]
    assert options_to_args({"slots": 2, "slot_wait": 1.5}) == [
        "--slots",
        "2",
        "--slot-wait",
        "1.5",
    ]
    with pytest.raises(OptionsError, match="unknown add-on option 'nonsense'"):
        options_to_args({"nonsense": 1})
    with pytest.raises(OptionsError, match="line breaks"):
        options_to_args({"model": "a\nb"})


def test_options_main_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "options.json"
    bad.write_text('{"slots": 2, "mystery": true}', encoding="utf-8")
    for target in (bad, tmp_path / "missing.json"):
        proc = subprocess.run(
            [sys.executable, "-m", "wyoming_kyutai.addon_options", str(target)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr


def test_run_script_builds_a_command_line_the_server_accepts(
    manifest: dict[str, Any], tmp_path: Path
) -> None:
    options = dict(manifest["options"])
    options.update(
        model="/share/kyutai/stt-1b-en_fr-candle",
        languages=["en"],
        slots=2,
        slot_wait=3.5,
        end_of_turn=False,
        end_of_turn_threshold=0.7,
        server_ends_turns=True,
        quantize="int4",
        threads=3,
        offline=True,
        debug_logging=True,
    )
    options_file = tmp_path / "options.json"
    options_file.write_text(json.dumps(options), encoding="utf-8")
    env = _clean_env(
        KYUTAI_PYTHON=sys.executable,
        KYUTAI_OPTIONS_FILE=str(options_file),
        KYUTAI_NO_DISCOVERY="1",
    )
    proc = subprocess.run(
        ["bash", str(RUN_SCRIPT), "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["uri"] == "tcp://0.0.0.0:10300"
    assert printed["data_dir"] == "/data"
    assert printed["model"] == "/share/kyutai/stt-1b-en_fr-candle"
    assert printed["languages"] == ["en"]
    assert printed["slots"] == 2
    assert printed["slot_wait"] == 3.5
    assert printed["end_of_turn"] is False
    assert printed["end_of_turn_threshold"] == 0.7
    assert printed["server_ends_turns"] is True
    assert printed["quantize"] == "int4"
    assert printed["threads"] == 3
    assert printed["offline"] is True
    assert printed["debug"] is True
    # the add-on's defaults give the server's defaults, apart from where it listens and the
    # CPU-only tuning (fewer slots: every slot costs compute on each step, busy or not)
    options_file.write_text(json.dumps(manifest["options"]), encoding="utf-8")
    proc = subprocess.run(
        ["bash", str(RUN_SCRIPT), "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    differs = {k for k, v in printed.items() if v != DEFAULTS[k]}
    assert differs == {"uri", "data_dir", "slots", "slot_wait"}
    assert printed["quantize"] == "auto" and printed["slots"] == 2


def test_run_script_stops_on_bad_options(tmp_path: Path) -> None:
    options_file = tmp_path / "options.json"
    options_file.write_text('{"slots": 0}', encoding="utf-8")
    env = _clean_env(
        KYUTAI_PYTHON=sys.executable,
        KYUTAI_OPTIONS_FILE=str(options_file),
        KYUTAI_NO_DISCOVERY="1",
    )
    proc = subprocess.run(
        ["bash", str(RUN_SCRIPT), "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "setting 'slots': must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_scripts_are_valid_bash_and_executable() -> None:
    for script in (RUN_SCRIPT, DISCOVERY_SCRIPT):
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)


# --- discovery ----------------------------------------------------------------------------


class _FakeSupervisor:
    """Answers /addons/self/info and records POSTs to /discovery."""

    def __init__(self, hostname: str, token: str) -> None:
        self.posts: list[tuple[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {token}":
                    return True
                self.send_error(401)
                return False

            def do_GET(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                body = json.dumps({"result": "ok", "data": {"hostname": hostname}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                length = int(self.headers.get("Content-Length", "0"))
                outer.posts.append((self.path, json.loads(self.rfile.read(length))))
                body = b'{"result": "ok", "data": {"uuid": "x"}}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @contextlib.contextmanager
    def running(self) -> Iterator[_FakeSupervisor]:
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()


@contextlib.asynccontextmanager
async def _fake_stt_server(port: int) -> AsyncIterator[None]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        event = await async_read_event(reader)
        if event is not None and event.type == "describe":
            info = {"asr": [{"name": "kyutai", "installed": True, "models": []}]}
            await async_write_event(Event("info", info), writer)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _start_discovery(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "bash",
        str(DISCOVERY_SCRIPT),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq (as the add-on)"
)
async def test_discovery_announces_once_the_server_answers(tmp_path: Path) -> None:
    supervisor = _FakeSupervisor("a0d7b954-kyutai-stt", token="secret")
    port = _free_port()
    # a python that notes every health check the script runs
    checks = tmp_path / "checks.log"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {checks}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    with supervisor.running():
        proc = await _start_discovery(
            _clean_env(
                KYUTAI_PYTHON=str(python),
                KYUTAI_PORT=str(port),
                KYUTAI_DISCOVERY_POLL="0.1",
                SUPERVISOR_API=supervisor.url,
                SUPERVISOR_TOKEN="secret",
            )
        )
        # the model is still loading, nothing listens yet: the script checks and waits
        deadline = time.monotonic() + 20
        while _lines(checks) < 3:
            assert time.monotonic() < deadline, "the discovery script does not check"
            await asyncio.sleep(0.02)
        assert proc.returncode is None
        assert supervisor.posts == []
        async with _fake_stt_server(port):
            code, err = await _finish(proc)
    assert code == 0, err
    uri = f"tcp://a0d7b954-kyutai-stt:{port}"
    assert supervisor.posts == [("/discovery", {"service": "wyoming", "config": {"uri": uri}})]
    assert f"announced {uri}" in err


async def test_discovery_without_supervisor_token_does_nothing() -> None:
    code, err = await _finish(await _start_discovery(_clean_env(KYUTAI_PYTHON=sys.executable)))
    assert code == 0
    assert "no SUPERVISOR_TOKEN" in err


# --- Dockerfiles ----------------------------------------------------------------------------


def _parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, rest = full.partition(" ")
        result.append((instruction.upper(), rest.strip()))
    assert not pending, "dangling continuation line"
    return result


def _instructions(path: Path, name: str) -> list[str]:
    return [rest for instruction, rest in _parse_dockerfile(path) if instruction == name]


def _exec_form(text: str) -> list[str]:
    value = json.loads(text) if text.startswith("[") else shlex.split(text)
    assert isinstance(value, list)
    return [str(x) for x in value]


def _copy_sources(path: Path) -> list[str]:
    sources: list[str] = []
    for rest in _instructions(path, "COPY"):
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        assert len(words) >= 2, rest
        sources += words[:-1]
    return sources


def test_root_dockerfile() -> None:
    dockerfile = ROOT / "Dockerfile"
    parsed = _parse_dockerfile(dockerfile)
    assert parsed[0][0] in ("ARG", "FROM")
    for source in _copy_sources(dockerfile):
        assert (ROOT / source).exists(), source
    runs = _instructions(dockerfile, "RUN")
    assert any("script/setup --no-dev" in run and "VENV=/app/.venv" in run for run in runs)
    assert any("torch==" in a for a in _instructions(dockerfile, "ARG") if "TORCH_SPEC" in a)
    # what script/setup and `pip install -e .` read is in the image
    copied = set(_copy_sources(dockerfile))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for needed in ("pyproject.toml", pyproject["project"]["readme"]):
        assert needed in copied, needed
    for needed in ("script/", "wyoming_kyutai/", "config/"):
        assert needed in copied, needed
    users = _instructions(dockerfile, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert _instructions(dockerfile, "EXPOSE") == ["10300"]
    assert _instructions(dockerfile, "VOLUME") == ["/data"]
    env_text = " ".join(_instructions(dockerfile, "ENV"))
    assert "WYOMING_KYUTAI_DATA_DIR=/data" in env_text
    assert "HF_HOME=/data/hf" in env_text
    (healthcheck,) = _instructions(dockerfile, "HEALTHCHECK")
    command = _exec_form(healthcheck.partition("CMD")[2].strip())
    assert command[:2] == [f"/app/.venv/bin/{_SCRIPTS['wyoming_kyutai.health:main']}", "--uri"]
    assert command[2] == "tcp://127.0.0.1:10300"


def test_root_dockerfile_command_is_accepted_by_the_server() -> None:
    """The ENTRYPOINT's flags + the image's environment, through the server's parser."""
    dockerfile = ROOT / "Dockerfile"
    (entrypoint,) = _instructions(dockerfile, "ENTRYPOINT")
    command = _exec_form(entrypoint)
    assert command[0] == f"/app/.venv/bin/{_SCRIPTS['wyoming_kyutai.__main__:main']}"
    args = [a.replace("/app/", f"{ROOT}/") for a in command[1:]]
    assert f"{ROOT}/config/default.yaml" in args
    proc = subprocess.run(
        [sys.executable, "-m", "wyoming_kyutai", *args, "--print-config"],
        capture_output=True,
        text=True,
        env=_clean_env(WYOMING_KYUTAI_DATA_DIR="/data", WYOMING_KYUTAI_SLOTS="8"),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["uri"] == "tcp://0.0.0.0:10300"
    assert printed["data_dir"] == "/data"
    assert printed["slots"] == 8


def test_addon_dockerfile() -> None:
    dockerfile = ADDON / "Dockerfile"
    parsed = _parse_dockerfile(dockerfile)
    assert parsed[0] == ("ARG", "BUILD_FROM=ghcr.io/home-assistant/amd64-base-debian:bookworm")
    assert ("FROM", "${BUILD_FROM}") in parsed
    for source in _copy_sources(dockerfile):
        assert (ADDON / source).exists(), source
    runs = " ".join(_instructions(dockerfile, "RUN"))
    assert "script/setup --no-dev" in runs
    assert "v${BUILD_VERSION}" in runs
    (torch,) = [a for a in _instructions(dockerfile, "ARG") if a.startswith("TORCH_SPEC=")]
    assert "download.pytorch.org/whl/cpu" in torch  # no GPU in Home Assistant OS
    (cmd,) = _instructions(dockerfile, "CMD")
    program = _exec_form(cmd)[0]
    assert (ADDON / "rootfs" / program.lstrip("/")) == RUN_SCRIPT


# --- .dockerignore ----------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def _dockerignored(path: str, lines: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent directory counts."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = _pattern_regex(line.removeprefix("!").strip().strip("/"))
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#") and "*" in lines  # allow-list style
    checked = 0
    for source in _copy_sources(ROOT / "Dockerfile"):
        base = ROOT / source
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(ROOT).as_posix()
            if "__pycache__" in rel.split("/") or rel.endswith(".pyc"):
                assert _dockerignored(rel, lines), rel
                continue
            assert not _dockerignored(rel, lines), rel
            checked += 1
    assert checked >= 10
    for unwanted in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_addon.py",
        "local/tiny/model.safetensors",
        "benchmarks/checkpoints/x",
        "addon/kyutai_stt/config.yaml",
        "wyoming_kyutai.egg-info/PKG-INFO",
        "Dockerfile",
    ):
        assert _dockerignored(unwanted, lines), unwanted


# --- publishing the prebuilt images ------------------------------------------------------------

WORKFLOW = ROOT / ".github" / "workflows" / "addon-publish.yaml"


def _builder_args(workflow: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    steps = workflow["jobs"]["publish"]["steps"]
    (builder,) = [s for s in steps if str(s.get("uses", "")).startswith("home-assistant/builder@")]
    return builder, shlex.split(builder["with"]["args"].replace("\\\n", " "))


def test_publish_workflow_builds_every_declared_arch_into_the_manifest_image(
    manifest: dict[str, Any],
) -> None:
    workflow = _yaml(WORKFLOW)
    # PyYAML reads the key `on` as True
    assert workflow[True]["release"]["types"] == ["published"]
    job = workflow["jobs"]["publish"]
    assert job["strategy"]["matrix"]["arch"] == manifest["arch"]
    assert workflow["permissions"]["packages"] == "write"
    builder, args = _builder_args(workflow)
    assert args[:3] == ["--${{", "matrix.arch", "}}"] and "--addon" in args  # one arch per job
    target = args[args.index("--target") + 1]
    assert target.startswith("/data/")  # the builder mounts the checkout at /data
    assert (ROOT / target.removeprefix("/data/")).resolve() == ADDON.resolve()
    hub, image = args[args.index("--docker-hub") + 1], args[args.index("--image") + 1]
    assert manifest["image"] == f"{hub}/{image}"
    assert "{arch}" in manifest["image"]
    # the image's owner is the repository's (repository.yaml, the manifest's url)
    owner = _yaml(ROOT / "repository.yaml")["url"].removeprefix("https://github.com/")
    assert hub == f"ghcr.io/{owner.split('/')[0]}"
    assert manifest["url"] == _yaml(ROOT / "repository.yaml")["url"]


def test_publish_workflow_checks_the_release_tag_against_the_versions(
    manifest: dict[str, Any], tmp_path: Path
) -> None:
    """Run the workflow's version check as GitHub would, with a good and a bad tag."""
    steps = _yaml(WORKFLOW)["jobs"]["publish"]["steps"]
    (check,) = [s for s in steps if "version" in s.get("name", "")]
    for tag, ok in ((f"v{manifest['version']}", True), ("v0.0.0-bad", False)):
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", check["run"]],
            cwd=ROOT,
            env={**_clean_env(), "GITHUB_REF_NAME": tag},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert (proc.returncode == 0) is ok, (tag, proc.stdout, proc.stderr)


def test_builder_build_args_reach_the_addon_dockerfile(manifest: dict[str, Any]) -> None:
    """The builder passes BUILD_FROM (build.yaml), BUILD_VERSION (config.yaml) and
    BUILD_ARCH; the Dockerfile must declare the ones it uses."""
    dockerfile_args = {a.split("=")[0] for a in _instructions(ADDON / "Dockerfile", "ARG")}
    assert {"BUILD_FROM", "BUILD_VERSION"} <= dockerfile_args
    runs = " ".join(_instructions(ADDON / "Dockerfile", "RUN"))
    assert "v${BUILD_VERSION}" in runs  # the sources of the release being published


def test_docs_say_what_is_untested_on_arm(manifest: dict[str, Any]) -> None:
    docs = (ADDON / "DOCS.md").read_text(encoding="utf-8")
    assert "aarch64" in manifest["arch"]
    assert "not yet run on ARM hardware" in docs
