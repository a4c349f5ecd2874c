"""The file transcription command, as a subprocess."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.audio_gen import silence, speechlike, write_wav
from wyoming_kyutai.audio import MODEL_RATE
from wyoming_kyutai.checkpoint import LoadedModel


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wyoming_kyutai.transcribe", *args],
        capture_output=True,
        text=True,
        timeout=120,
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
