"""The protocol state machine driven by a scripted engine (no model, no sockets)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event

from tests.test_decoding import FakeTokenizer
from wyoming_kyutai.app import build_info
from wyoming_kyutai.endpointing import EndOfTurnSettings, TurnPolicy
from wyoming_kyutai.engine_types import EngineBusy, StepResult
from wyoming_kyutai.handler import HandlerSettings, SttHandler

# token, pause probability per 80 ms step: "turn on the kitchen" then a long pause
SCRIPT = [
    (4, 0.1),
    (3, 0.2),
    (5, 0.1),
    (6, 0.1),
    (7, 0.0),
    (8, 0.3),
    (3, 0.4),
    (3, 0.95),
    (3, 0.97),
    (3, 0.99),
]


@dataclass
class FakeModel:
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    audio_delay_seconds: float = 0.0
    silence_prefix_seconds: float = 0.0
    num_vad_heads: int = 4
    languages: list[str] = field(default_factory=lambda: ["en"])
    text_padding_id: int = 3
    end_of_padding_id: int = 0
    frame_rate: float = 12.5


class ScriptedStream:
    """Gives SCRIPT[i] for the i-th 1920-sample frame pushed; padding+pause 0 after;
    ``shed``: step index: frames dropped unheard before it (the engine's lag bound)."""

    def __init__(self, script: list[tuple[int, float]], shed: dict[int, int] | None = None) -> None:
        self.script = script
        self.shed = shed or {}
        self.queue: asyncio.Queue[StepResult | None] = asyncio.Queue()
        self.samples = 0
        self.steps = 0
        self.finished = False
        self.closed = False

    def _emit(self) -> None:
        token, pause = self.script[self.steps] if self.steps < len(self.script) else (3, 0.0)
        shed = self.shed.get(self.steps, 0)
        result = StepResult(self.steps, token, (0.0, 0.0, pause, 0.0), 0.0, shed)
        self.queue.put_nowait(result)
        self.steps += 1

    def push(self, samples: np.ndarray) -> None:
        if self.finished:
            return
        self.samples += len(samples)
        while self.samples >= 1920 * (self.steps + 1):
            self._emit()

    def finish(self) -> None:
        self.finished = True
        self._emit()  # the flush gives one more step
        self.queue.put_nowait(None)

    async def get(self) -> StepResult | None:
        item = await self.queue.get()
        if item is None:
            self.queue.put_nowait(None)
        return item

    def close(self) -> None:
        self.closed = True


class ScriptedEngine:
    def __init__(
        self,
        busy: bool = False,
        script: list[tuple[int, float]] = SCRIPT,
        shed: dict[int, int] | None = None,
    ) -> None:
        self.busy = busy
        self.script = script
        self.shed = shed
        self.streams: list[ScriptedStream] = []
        self.names: list[object] = []  # each stream's names trie, as opened

    async def open_stream(self, wait: float = 0.0, names: object = None) -> ScriptedStream:
        self.names.append(names)
        if self.busy:
            raise EngineBusy("all 1 slots are busy")
        stream = ScriptedStream(self.script, self.shed)
        self.streams.append(stream)
        return stream


def _handler(
    engine: ScriptedEngine, eot: EndOfTurnSettings, no_speech: float = 0.0
) -> tuple[SttHandler, list[Event]]:
    sent: list[Event] = []

    async def send(event: Event) -> None:
        sent.append(event)

    info = build_info("scripted", ["en"], False)
    settings = HandlerSettings(turn=TurnPolicy(end_of_turn=eot, no_speech_timeout=no_speech))
    handler = SttHandler(engine, FakeModel(), info, settings, send, ["en"])
    return handler, sent


def _chunk(frames: int) -> Event:
    # 16 kHz input: 1280 samples per 80 ms model frame
    audio = np.zeros(1280 * frames, dtype="<i2").tobytes()
    return AudioChunk(rate=16000, width=2, channels=1, audio=audio).event()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_end_of_turn_sends_the_final_transcript_before_audio_stop() -> None:
    engine = ScriptedEngine()
    handler, sent = _handler(engine, EndOfTurnSettings(ignore_steps=0, consecutive_steps=1))
    assert await handler.handle_event(AudioStart(rate=16000, width=2, channels=1).event())
    for _ in range(10):
        assert await handler.handle_event(_chunk(1))
        await _settle()
    types = [e.type for e in sent]
    # fired at step 7 (pause 0.95 after words): flush, voice-stopped, transcript, stop
    assert types[-3:] == ["voice-stopped", "transcript", "transcript-stop"]
    assert sent[-2].data["text"] == "turn on the kitchen"
    assert "".join(e.data["text"] for e in sent if e.type == "transcript-chunk") == (
        "turn on the kitchen"
    )
    assert sent[-3].data["timestamp"] == 640  # end of step 7
    stream = engine.streams[0]
    assert stream.finished and stream.closed
    # the rest of the upload is read and discarded; audio-stop closes the turn quietly
    count = len(sent)
    assert handler.in_utterance
    assert await handler.handle_event(_chunk(5))
    assert await handler.handle_event(AudioStop().event())
    assert len(sent) == count and not handler.in_utterance


async def test_without_end_of_turn_audio_stop_ends_the_utterance() -> None:
    engine = ScriptedEngine()
    handler, sent = _handler(engine, EndOfTurnSettings(enabled=False))
    await handler.handle_event(AudioStart(rate=16000, width=2, channels=1).event())
    await handler.handle_event(_chunk(10))
    await _settle()
    assert "transcript" not in [e.type for e in sent]
    await handler.handle_event(AudioStop().event())
    types = [e.type for e in sent]
    assert types[0] == "transcript-start" and types[1] == "voice-started"
    assert types[-2:] == ["transcript", "transcript-stop"] and "voice-stopped" not in types


async def test_busy_engine_gives_a_busy_error_and_close() -> None:
    handler, sent = _handler(ScriptedEngine(busy=True), EndOfTurnSettings())
    keep = await handler.handle_event(AudioStart(rate=16000, width=2, channels=1).event())
    assert keep is False
    assert sent[-1].type == "error" and sent[-1].data["code"] == "busy"


async def test_chunk_before_start_and_format_change_are_errors() -> None:
    handler, sent = _handler(ScriptedEngine(), EndOfTurnSettings())
    assert await handler.handle_event(_chunk(1)) is False
    assert sent[-1].data["code"] == "unexpected-event"
    handler, sent = _handler(ScriptedEngine(), EndOfTurnSettings())
    await handler.handle_event(AudioStart(rate=16000, width=2, channels=1).event())
    changed = AudioChunk(rate=8000, width=2, channels=1, audio=b"\0\0").event()
    assert await handler.handle_event(changed) is False
    assert sent[-1].data["code"] == "audio-format-changed"


async def test_no_speech_ends_the_turn_with_an_empty_transcript() -> None:
    engine = ScriptedEngine(script=[(3, 0.0)] * 20)
    handler, sent = _handler(
        engine, EndOfTurnSettings(ignore_steps=0, consecutive_steps=1), no_speech=0.4
    )
    await handler.handle_event(AudioStart(rate=16000, width=2, channels=1).event())
    for _ in range(8):
        await handler.handle_event(_chunk(1))
        await _settle()
    transcript = next(e for e in sent if e.type == "transcript")
    assert transcript.data["text"] == ""
    assert transcript.data["context"]["ended_by"] == "no-speech"
    assert sent[-1].type == "transcript-stop"
    assert engine.streams[0].steps <= 7  # ended at 0.4 s of audio, not at the end


async def test_audio_shed_by_the_lag_bound_is_counted_in_the_transcript() -> None:
    """The engine dropped 5 frames unheard (the CPU fell max_lag behind): the transcript's
    stats say so, for the client and the logs; nothing else changes."""
    engine = ScriptedEngine(shed={3: 5})
    handler, sent = _handler(engine, EndOfTurnSettings(enabled=False))
    await handler.handle_event(AudioStart(rate=16000, width=2, channels=1).event())
    await handler.handle_event(_chunk(10))
    await handler.handle_event(AudioStop().event())
    transcript = next(e for e in sent if e.type == "transcript")
    assert transcript.data["context"]["stats"]["shed_seconds"] == 0.4
    assert transcript.data["text"] == "turn on the kitchen"


async def test_transcribe_names_and_terms_bias_that_utterance_on_top_of_the_servers() -> None:
    import sentencepiece as spm
    from wyoming.asr import Transcribe

    from tests.test_names import CHECKPOINT
    from wyoming_kyutai.name_book import NameBook

    sp = spm.SentencePieceProcessor(model_file=str(next(CHECKPOINT.glob("*.model"))))
    engine = ScriptedEngine()
    handler, sent = _handler(engine, EndOfTurnSettings(enabled=False))
    handler.settings = HandlerSettings(names=NameBook(sp, 2.0, ["kitchen light"]))
    start = AudioStart(rate=16000, width=2, channels=1).event()
    asks = Transcribe(language="en", transcript_names=["Ecobee"], transcript_terms=["hue go"])
    for event in (asks.event(), start, _chunk(2), AudioStop().event()):
        assert await handler.handle_event(event)
    await _settle()
    # a transcribe without names: back to the server's own
    for event in (Transcribe(language="en").event(), start, AudioStop().event()):
        assert await handler.handle_event(event)
    own, plain = engine.names
    assert len(own) == 3 and len(plain) == 1  # type: ignore[arg-type]
    # a bad list is the client's mistake: one error, and the connection ends
    bad = Event("transcribe", {"language": "en", "transcript_names": "Ecobee"})
    assert await handler.handle_event(bad) is False
    assert sent[-1].type == "error" and sent[-1].data["code"] == "bad-event"
    assert "transcript_names" in sent[-1].data["text"]


async def test_a_clients_names_are_encoded_off_the_event_loop() -> None:
    """A new list of names is encoded in a worker thread: the event loop serves every other
    connection meanwhile."""
    import threading

    import sentencepiece as spm
    from wyoming.asr import Transcribe

    from tests.test_names import CHECKPOINT
    from wyoming_kyutai.name_book import NameBook

    sp = spm.SentencePieceProcessor(model_file=str(next(CHECKPOINT.glob("*.model"))))
    threads: set[threading.Thread] = set()

    class Watched:
        def encode(self, text: str) -> list[int]:
            threads.add(threading.current_thread())
            return sp.encode(text)

        def id_to_piece(self, token: int) -> str:
            return sp.id_to_piece(token)

        def get_piece_size(self) -> int:
            return sp.get_piece_size()

    engine = ScriptedEngine()
    handler, _sent = _handler(engine, EndOfTurnSettings(enabled=False))
    handler.settings = HandlerSettings(names=NameBook(Watched(), 2.0))
    asks = Transcribe(language="en", transcript_names=["Ecobee", "Hue Go"])
    for event in (asks.event(), AudioStart(rate=16000, width=2, channels=1).event()):
        assert await handler.handle_event(event)
    assert engine.names[0] is not None
    assert threads and threading.current_thread() not in threads


async def test_without_names_the_engine_gets_none() -> None:
    from wyoming.asr import Transcribe

    engine = ScriptedEngine()
    handler, _sent = _handler(engine, EndOfTurnSettings(enabled=False))
    asks = Transcribe(language="en", transcript_names=["Ecobee"])
    for event in (asks.event(), AudioStart(rate=16000, width=2, channels=1).event()):
        assert await handler.handle_event(event)
    assert engine.names == [None]  # no name book: the server does not bias at all


async def test_describe_tells_satellites_which_audio_processing_we_prefer() -> None:
    from wyoming.info import Describe

    handler, sent = _handler(ScriptedEngine(), EndOfTurnSettings())
    assert await handler.handle_event(Describe().event())
    asr = sent[-1].data["asr"][0]
    assert asr["prefers_auto_gain_enabled"] and asr["prefers_noise_reduction_enabled"]
    handler.info = build_info("scripted", ["en"], False, auto_gain=False, noise_reduction=False)
    assert await handler.handle_event(Describe().event())
    asr = sent[-1].data["asr"][0]
    assert asr["prefers_auto_gain_enabled"] is False
    assert asr["prefers_noise_reduction_enabled"] is False
