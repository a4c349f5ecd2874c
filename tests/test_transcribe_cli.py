"""The file transcription command, as a subprocess."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.audio_gen import silence, speechlike, to_pcm, write_wav
from tests.wyoming_io import Client, running_app
from wyoming_kyutai.audio import MODEL_RATE
from wyoming_kyutai.loaded_model import LoadedModel


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WYOMING_KYUTAI_")}
    return subprocess.run(
        [sys.executable, "-m", "wyoming_kyutai.transcribe", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )


def test_json_output_per_file(tiny_dir: Path, tiny_model: LoadedModel, tmp_path: Path) -> None:
    a = write_wav(tmp_path / "a.wav", speechlike(2.0, 16000, seed=1))
    b = write_wav(
        tmp_path / "b.wav",
        np.concatenate([speechlike(1.0, 44100, 2), silence(0.5, 44100)]),
        44100,
        2,
        2,
    )
    proc = _run(
        "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--json", str(a), str(b)
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["file"] for r in records] == [str(a), str(b)]
    for r in records:
        assert set(r) == {"file", "text", "words", "end_of_turn", "steps"}
        assert r["text"] and r["text"] == " ".join(w["word"] for w in r["words"])
        assert all(0 <= w["start"] <= w["end"] for w in r["words"])
        assert all(isinstance(s["token"], int) and 0 <= s["pause"] <= 1 for s in r["steps"])
    # one step per model frame of the 2.0 s of audio, then the flush
    frames = math.ceil(2.0 * MODEL_RATE / tiny_model.frame_size)
    assert len(records[0]["steps"]) == frames + tiny_model.flush_frames
    # the plain output prints the same transcript
    plain = _run("--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", str(a))
    assert plain.stdout.strip() == records[0]["text"]


def test_errors_are_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    missing = _run("--model", str(tiny_dir), str(tmp_path / "nope.wav"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.wav'}: no such file"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    proc = _run("--model", str(tiny_dir), str(bad))
    assert proc.returncode == 1 and "not a PCM WAV file" in proc.stderr
    assert "Traceback" not in proc.stderr
    nomodel = _run("--model", str(tmp_path), str(write_wav(tmp_path / "x.wav", silence(0.2))))
    assert nomodel.returncode == 1
    assert "has no config.json" in nomodel.stderr and "Traceback" not in nomodel.stderr


async def test_end_of_turn_times_are_the_servers(pause_dir: Path, tmp_path: Path) -> None:
    """The same settings, given as flags, environment or YAML, end the turn where the
    server ends it."""
    audio = np.concatenate([_noise(1.6, seed=1), silence(2.0)])
    wav = write_wav(tmp_path / "turn.wav", audio)
    config = tmp_path / "settings.yaml"
    config.write_text("end_of_turn_ignore_steps: 4\nquantize: none\n")
    base = ("--model", str(pause_dir), "--device", "cpu", "--dtype", "float32", "--json")
    env = {"WYOMING_KYUTAI_END_OF_TURN_THRESHOLD": "0.6"}
    proc = await asyncio.to_thread(_run, *base, "--config", str(config), str(wav), env=env)
    assert proc.returncode == 0, proc.stderr
    ends = json.loads(proc.stdout)["end_of_turn"]
    assert ends
    off = await asyncio.to_thread(_run, *base, "--no-end-of-turn", str(wav))
    assert json.loads(off.stdout)["end_of_turn"] == []
    off_env = await asyncio.to_thread(
        _run, *base, str(wav), env={"WYOMING_KYUTAI_END_OF_TURN": "false"}
    )
    assert json.loads(off_env.stdout)["end_of_turn"] == []

    async with running_app(
        pause_dir, end_of_turn_ignore_steps=4, end_of_turn_threshold=0.6, quantize="none"
    ) as app:
        client = await Client.connect(app.server.address)
        await client.start_audio()
        await client.send_audio(to_pcm(audio))
        events = await client.read_until("transcript-stop", timeout=30)
        await client.close()
    stopped = next(e for e in events if e.type == "voice-stopped")
    assert abs(stopped.data["timestamp"] - ends[0] * 1000) <= 1


def _noise(seconds: float, seed: int) -> np.ndarray:
    """Loud noise: the pause-on-silence checkpoint hears words in it, and no pause."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 0.3).astype(np.float32)
