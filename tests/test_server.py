"""The real server in-process over real TCP sockets, with tiny generated checkpoints."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import numpy as np
from wyoming.asr import Transcribe
from wyoming.audio import AudioStop
from wyoming.info import Describe

from tests.audio_gen import silence, speechlike, to_pcm
from tests.wyoming_io import Client, final_text, joined_deltas, running_app
from wyoming_kyutai.__main__ import zeroconf_host


def _noise(seconds: float, seed: int) -> np.ndarray:
    """Loud noise: the pause-on-silence checkpoint hears words in it, and no pause."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 0.3).astype(np.float32)


async def _until_slots_free(app, expected: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.engine.free_slots == expected:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_concurrent_clients_get_what_they_get_alone(tiny_dir: Path) -> None:
    audios = [to_pcm(speechlike(1.0 + 0.4 * i, seed=10 + i)) for i in range(4)]
    async with running_app(tiny_dir, slots=4, end_of_turn=False) as app:
        alone = []
        for pcm in audios:
            client = await Client.connect(app.server.address)
            alone.append(final_text(await client.utterance(pcm)))
            await client.close()

        async def one(pcm: bytes, pace: float) -> str:
            client = await Client.connect(app.server.address)
            try:
                events = await client.utterance(pcm, pace=pace)
                assert joined_deltas(events) == final_text(events)
                return final_text(events)
            finally:
                await client.close()

        together = await asyncio.gather(*(one(p, 0.002 * i) for i, p in enumerate(audios)))
        assert list(together) == alone
        assert len(set(alone)) == 4 and all(alone)
        assert await _until_slots_free(app, 4)


async def test_early_end_of_turn_answers_before_audio_stop(pause_dir: Path) -> None:
    speech = to_pcm(np.concatenate([_noise(1.6, 1), silence(2.0)]))
    async with running_app(pause_dir, slots=2, end_of_turn_ignore_steps=4) as app:
        client = await Client.connect(app.server.address)
        await client.send(Transcribe(language="en").event())
        await client.start_audio()
        await client.send_audio(speech)  # no audio-stop yet
        events = await client.read_until("transcript-stop", timeout=20)
        types = [e.type for e in events]
        assert types[0] == "transcript-start"
        assert types[-3:] == ["voice-stopped", "transcript", "transcript-stop"]
        transcript = events[-2]
        assert transcript.data["text"] and transcript.data["text"] == joined_deltas(events)
        assert transcript.data["context"]["end_of_turn"] is True
        stopped_ms = events[-3].data["timestamp"]
        assert 1600 <= stopped_ms <= 2400  # the turn ended shortly after the speech did
        # the satellite keeps uploading: read and discarded, connection stays open
        await client.send_audio(to_pcm(_noise(0.5, 2)))
        await client.send(AudioStop().event())
        assert await _until_slots_free(app, 2)
        # and the same connection serves the next utterance
        events = await client.utterance(to_pcm(np.concatenate([_noise(1.0, 3), silence(1.5)])))
        assert events[-1].type == "transcript-stop" and final_text(events)
        await client.close()


async def test_end_of_turn_can_be_turned_off(pause_dir: Path) -> None:
    pcm = to_pcm(np.concatenate([_noise(1.0, 4), silence(2.0)]))
    async with running_app(pause_dir, end_of_turn=False) as app:
        client = await Client.connect(app.server.address)
        await client.start_audio()
        await client.send_audio(pcm)
        try:
            early = await client.read_until("transcript", timeout=2.0)
        except TimeoutError:
            early = None
        assert early is None
        await client.send(AudioStop().event())
        events = await client.read_until("transcript-stop")
        assert "voice-stopped" not in [e.type for e in events]
        await client.close()


async def test_busy_answers_error_and_closes(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, slots=1, slot_wait=0.3, end_of_turn=False) as app:
        holder = await Client.connect(app.server.address)
        await holder.start_audio()
        await holder.send_audio(to_pcm(speechlike(0.5)))
        await holder.read_until("transcript-start")
        other = await Client.connect(app.server.address)
        started = time.monotonic()
        await other.start_audio()
        error = await other.read(5)
        assert error is not None and error.type == "error"
        assert error.data["code"] == "busy"
        assert time.monotonic() - started < 3
        assert await other.is_closed()
        # the holder is unaffected
        await holder.send(AudioStop().event())
        events = await holder.read_until("transcript-stop")
        assert final_text(events)
        await holder.close()


async def test_describe_is_fast_while_every_slot_is_busy(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, slots=2, end_of_turn=False) as app:
        busy = []
        for i in range(2):
            client = await Client.connect(app.server.address)
            await client.start_audio()
            await client.read_until("transcript-start")
            await client.send_audio(to_pcm(speechlike(6.0, seed=i)))  # work queued
            busy.append(client)
        assert app.engine.free_slots == 0
        asker = await Client.connect(app.server.address)
        worst = 0.0
        for _ in range(5):
            started = time.monotonic()
            await asker.send(Describe().event())
            info = await asker.read(5)
            worst = max(worst, time.monotonic() - started)
            assert info is not None and info.type == "info"
        assert info is not None
        program = info.data["asr"][0]
        assert program["supports_transcript_streaming"] is True
        assert program["requires_external_vad"] is True
        assert program["models"][0]["languages"] == ["en", "fr"]
        # Home Assistant allows 1 s; the event loop never runs model code
        assert worst < 0.5, worst
        for client in busy + [asker]:
            await client.close()
        assert await _until_slots_free(app, 2)


async def test_eof_mid_utterance_frees_the_slot(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, slots=1, end_of_turn=False) as app:
        client = await Client.connect(app.server.address)
        await client.start_audio()
        await client.send_audio(to_pcm(speechlike(3.0)))
        await client.read_until("transcript-start")
        assert app.engine.free_slots == 0
        client.writer.transport.abort()  # reset, no audio-stop
        assert await _until_slots_free(app, 1)
        again = await Client.connect(app.server.address)
        assert final_text(await again.utterance(to_pcm(speechlike(0.8))))
        await again.close()


async def test_unsupported_language_is_an_error(tiny_dir: Path) -> None:
    async with running_app(tiny_dir) as app:
        client = await Client.connect(app.server.address)
        await client.send(Transcribe(language="de").event())
        error = await client.read(5)
        assert error is not None and error.type == "error"
        assert error.data["code"] == "unsupported-language"
        assert await client.is_closed()
        ok = await Client.connect(app.server.address)
        await ok.send(Transcribe(language="fr-FR").event())
        events = await ok.utterance(to_pcm(speechlike(0.8)))
        assert next(e for e in events if e.type == "transcript").data["language"] == "fr"
        await ok.close()


async def test_no_audio_gives_an_empty_transcript(tiny_dir: Path) -> None:
    async with running_app(tiny_dir) as app:
        client = await Client.connect(app.server.address)
        events = await client.utterance(b"")
        assert [e.type for e in events] == ["transcript-start", "transcript", "transcript-stop"]
        assert final_text(events) == ""
        await client.close()


def test_zeroconf_never_announces_a_wildcard_address() -> None:
    assert zeroconf_host("tcp://0.0.0.0:10300") is None  # auto-detect the LAN address
    assert zeroconf_host("tcp://[::]:10300") is None
    assert zeroconf_host("tcp://192.168.1.20:10300") == "192.168.1.20"


async def test_connections_beyond_the_limit_are_refused_with_an_error(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, max_connections=2) as app:
        first = await Client.connect(app.server.address)
        second = await Client.connect(app.server.address)
        await first.send(Describe().event())
        await first.read(5)
        await second.send(Describe().event())
        await second.read(5)
        third = await Client.connect(app.server.address)
        error = await third.read(5)
        assert error is not None and error.data["code"] == "too-many-connections"
        assert await third.is_closed()
        await first.close()
        deadline = time.monotonic() + 5
        while len(app.server.connections) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        fourth = await Client.connect(app.server.address)
        await fourth.send(Describe().event())
        info = await fourth.read(5)
        assert info is not None and info.type == "info"
        await second.close()
        await fourth.close()


async def test_idle_and_audio_timeouts(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, idle_timeout=0.3, audio_timeout=0.5, end_of_turn=False) as app:
        idle = await Client.connect(app.server.address)
        started = time.monotonic()
        assert await idle.is_closed(3)  # closed quietly, no event
        assert time.monotonic() - started < 2
        stalled = await Client.connect(app.server.address)
        await stalled.start_audio()
        await stalled.send_audio(to_pcm(speechlike(0.3)))
        events = await stalled.read_until("error", timeout=5)
        assert events[-1].data["code"] == "audio-timeout"
        assert await stalled.is_closed()
        assert await _until_slots_free(app, app.settings.slots)


async def test_utterance_length_limit_finishes_and_discards_the_rest(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, max_utterance_seconds=1.0, end_of_turn=False) as app:
        client = await Client.connect(app.server.address)
        await client.start_audio()
        await client.send_audio(to_pcm(speechlike(3.0, seed=9)))
        events = await client.read_until("transcript-stop")  # before any audio-stop
        assert final_text(events)
        await client.send(AudioStop().event())
        again = await client.utterance(to_pcm(speechlike(0.5)))
        assert again[-1].type == "transcript-stop"
        await client.close()


async def test_stopping_the_engine_ends_open_utterances_with_an_error(tiny_dir: Path) -> None:
    async with running_app(tiny_dir, end_of_turn=False) as app:
        client = await Client.connect(app.server.address)
        await client.start_audio()
        await client.read_until("transcript-start")
        await asyncio.to_thread(app.engine.stop)
        events = await client.read_until("error", timeout=10)
        assert events[-1].data["code"] == "shutting-down"
        await client.close()


async def test_a_ready_server_leaves_the_loaded_model_out_of_garbage_collections(
    tiny_dir: Path,
) -> None:
    """A full collection over the loaded model's objects took ~120 ms on the real model, on
    the engine's thread mid-step: once the server is up they are frozen, and a collection
    walks only what serving allocates."""
    gc.unfreeze()
    async with running_app(tiny_dir, slots=1) as app:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # torch's and the model's objects
        assert len(gc.get_objects()) < frozen  # what a collection still walks
        client = await Client.connect(app.server.address)
        assert final_text(await client.utterance(to_pcm(speechlike(0.5, seed=3))))
        await client.close()
