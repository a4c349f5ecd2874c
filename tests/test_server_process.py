"""The server as a subprocess: TCP and stdio end to end, the client command, exit codes."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import read_event, write_event
from wyoming.info import Describe

from tests.audio_gen import silence, speechlike, to_pcm, write_wav
from tests.reference import reference_text
from tests.wyoming_io import Client, final_text, joined_deltas, server_process
from wyoming_kyutai.loaded_model import LoadedModel

# float32 without int8: the transcripts must then be exactly those of Kyutai's own loop
MODEL_ARGS = ("--device", "cpu", "--dtype", "float32", "--quantize", "none", "--no-end-of-turn")


def _check_order(events: list) -> None:
    types = [e.type for e in events]
    assert types[0] == "transcript-start"
    assert types[-2:] == ["transcript", "transcript-stop"]
    middle = set(types[1:-2])
    assert middle <= {"transcript-chunk", "voice-started"}
    if "transcript-chunk" in types:
        assert types.index("voice-started") < types.index("transcript-chunk")
    assert joined_deltas(events) == final_text(events)


def test_tcp_end_to_end(tiny_dir: Path, tiny_moshi: LoadedModel, tmp_path: Path) -> None:
    audio = [np.concatenate([speechlike(2.0, seed=1), silence(0.5)]), speechlike(1.3, seed=2)]
    wavs = [write_wav(tmp_path / f"u{i}.wav", a) for i, a in enumerate(audio)]
    expected = [reference_text(tiny_moshi, to_pcm(a)) for a in audio]  # moshi's own loop
    assert all(expected) and expected[0] != expected[1]

    with server_process("--uri", "tcp://127.0.0.1:0", "--model", str(tiny_dir), *MODEL_ARGS) as (
        _proc,
        address,
    ):

        async def talk() -> list[list]:
            client = await Client.connect(address)
            try:
                # several utterances on one connection
                return [await client.utterance(to_pcm(a)) for a in audio]
            finally:
                await client.close()

        results = asyncio.run(talk())
        for events, text in zip(results, expected, strict=True):
            _check_order(events)
            assert final_text(events) == text
            transcript = next(e for e in events if e.type == "transcript")
            assert transcript.data["language"] == "en"
            words = transcript.data["context"]["words"]
            assert " ".join(w["word"] for w in words) == text

        # the client command against the same server
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "wyoming_kyutai.client",
                "--uri",
                address,
                "--json",
                str(wavs[0]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        record = json.loads(out.stdout)
        assert record["text"] == expected[0]
        assert record["time_to_first_chunk"] is not None
        assert record["end_of_audio_to_transcript"] >= 0
        assert record["events"][0]["type"] == "transcript-start"
        plain = subprocess.run(
            [sys.executable, "-m", "wyoming_kyutai.client", "--uri", address, str(wavs[1])],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plain.stdout.splitlines()[-1] == f"transcript: {expected[1]}"


def test_stdio_end_to_end(tiny_dir: Path, tiny_moshi: LoadedModel) -> None:
    audio = speechlike(1.5, seed=3)
    expected = reference_text(tiny_moshi, to_pcm(audio))  # moshi's own loop
    assert expected
    stdin = io.BytesIO()
    write_event(Describe().event(), stdin)
    write_event(AudioStart(rate=16000, width=2, channels=1).event(), stdin)
    pcm = to_pcm(audio)
    for pos in range(0, len(pcm), 2048):
        write_event(
            AudioChunk(rate=16000, width=2, channels=1, audio=pcm[pos : pos + 2048]).event(), stdin
        )
    write_event(AudioStop().event(), stdin)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wyoming_kyutai",
            "--uri",
            "stdio://",
            "--model",
            str(tiny_dir),
            *MODEL_ARGS,
        ],
        input=stdin.getvalue(),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = io.BytesIO(proc.stdout)
    events = []
    while (event := read_event(out)) is not None:
        events.append(event)
    assert events[0].type == "info"
    _check_order(events[1:])
    assert final_text(events) == expected
    assert b"Ready" in proc.stderr and b"Traceback" not in proc.stderr


def test_configuration_errors_exit_2_before_loading(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("slots: 2\nmystery: 1\n")
    cases = [
        (["--slots", "0"], {}, "error: setting 'slots': must be at least 1, got 0"),
        (["--config", str(bad_yaml)], {}, "error: unknown setting 'mystery' in the config file"),
        (
            [],
            {"WYOMING_KYUTAI_DTYPE": "float16"},
            "error: setting 'dtype': choose one of auto, float32, bfloat16, got 'float16'",
        ),
        (
            ["--uri", "http://x"],
            {},
            "error: setting 'uri': use tcp://HOST:PORT, unix://PATH or stdio://, got 'http://x'",
        ),
    ]
    for args, env, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "wyoming_kyutai", "--model", "/nonexistent", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**_base_env(), **env},
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip() == message


def test_print_config_shows_the_merged_settings(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("slots: 3\nthreads: 2\nend_of_turn_threshold: 0.7\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wyoming_kyutai",
            "--config",
            str(config),
            "--threads",
            "4",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_base_env(), "WYOMING_KYUTAI_SLOTS": "5", "WYOMING_KYUTAI_THREADS": "3"},
    )
    assert proc.returncode == 0, proc.stderr
    import yaml

    shown = yaml.safe_load(proc.stdout)
    assert shown["slots"] == 5  # env beats YAML
    assert shown["threads"] == 4  # flag beats env
    assert shown["end_of_turn_threshold"] == 0.7  # YAML beats default
    assert shown["max_connections"] == 0  # default: follows slots


def test_missing_model_is_one_line_exit_1(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wyoming_kyutai",
            "--uri",
            "tcp://127.0.0.1:0",
            "--model",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_base_env(),
    )
    assert proc.returncode == 1
    assert "has no config.json" in proc.stderr and "Traceback" not in proc.stderr


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("WYOMING_KYUTAI_")}


def test_slots_that_do_not_fit_in_memory_are_one_line_exit_1(tiny_dir: Path) -> None:
    """The slots' state is checked against the available memory before it is allocated."""
    pretend = (
        "import runpy, sys; import wyoming_kyutai.runtime.memory as m; "
        "m.available_bytes = lambda *a: 1_000_000; "  # 1 MB available
        f"sys.argv = ['x', '--uri', 'tcp://127.0.0.1:0', '--model', {str(tiny_dir)!r}, "
        "'--slots', '64']; runpy.run_module('wyoming_kyutai', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", pretend],
        capture_output=True,
        text=True,
        timeout=120,
        env=_base_env(),
    )
    assert proc.returncode == 1, proc.stderr
    # the name check's probes (on by default) count, and the advice says how to drop them
    assert "64 slots and 4 name-check probes need" in proc.stderr, proc.stderr
    assert "lower `slots`, or set `name_check` to 0" in proc.stderr
    assert "Traceback" not in proc.stderr
