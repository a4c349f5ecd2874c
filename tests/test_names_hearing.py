"""Names heard right through the real server, on the trained checkpoint (commands-en).

The WAVs under ``tests/audio/names`` are held-out commands (a voice, speed band and sentence
combinations the checkpoint never trained on) in which, without biasing, it mishears a word
it can write ("close the lock in the bathroom": "lock" comes out as another word). Each source
of names must make that word come out: the client's ``transcript_names``, the ``names``
setting, and Home Assistant's areas and exposed entities (a fake Home Assistant speaking its
websocket API), all at the default ``name_boost``.

The biasing names of ``domain.yaml`` (words it never saw in text) are another matter: this
checkpoint spells few unseen words, and shallow fusion gets none right at the default boost
(benchmarks/results/commands-en-names.md). The check of whole names at a stream's end
(``name_check.py``) gets some: the WAVs under ``tests/audio/names/unseen`` are commands by
the held-out voice naming one of them, which the server hears right only with the name
given and the check on.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from wyoming.asr import Transcribe

from tests.fake_hass import FakeEntity, running_fake
from tests.wyoming_io import Client, final_text, running_app
from training.evaluate import words_of
from wyoming_kyutai.audio import read_wav

ROOT = Path(__file__).parent
MODEL_DIR = ROOT / "checkpoints" / "commands-en"
AUDIO_DIR = ROOT / "audio" / "names"
MANIFEST = {item["name"]: item for item in json.loads((AUDIO_DIR / "manifest.json").read_text())}
AREA = next(item for item in MANIFEST.values() if "area" in item)
"""A command whose misheard word names an area (``"area"``: the whole area name)."""
DEVICE = next(item for item in MANIFEST.values() if "device" in item)
"""A command whose misheard word names a device (``"device"``: the whole device name)."""
NAME_FREE = ROOT / "audio" / "commands" / "words-1.wav"  # "turn off the washing machine ..."
UNSEEN = json.loads((AUDIO_DIR / "unseen" / "manifest.json").read_text())
"""Commands naming a name the checkpoint never saw in text (``"name"``)."""


async def _hear(
    address: str, name: str, names: list[str] | None = None, wav: Path | None = None
) -> list[str]:
    client = await Client.connect(address)
    try:
        await client.send(Transcribe(language="en", transcript_names=names).event())
        pcm = read_wav(wav or AUDIO_DIR / MANIFEST[name]["file"]).data
        return words_of(final_text(await client.utterance(pcm)))
    finally:
        await client.close()


@pytest.mark.parametrize("check", [True, False])
async def test_names_it_never_saw_come_out_whole_by_the_check(check: bool) -> None:
    """A client's names, at the default settings: the check of whole names writes each
    unseen name where the model wrote something else; with it off (``name_check`` 0),
    shallow fusion alone does not. A name-free command stays as it was either way."""
    overrides: dict[str, Any] = {} if check else {"name_check": 0.0}
    names = ["Ecobee", "Shelly Plug", "Sonos Arc", "Wiz Bulb", "Tado Valve", "Netatmo"]
    async with running_app(MODEL_DIR, slots=2, **overrides) as app:
        for item in UNSEEN:
            wav = AUDIO_DIR / "unseen" / item["file"]
            name = words_of(item["name"])
            plain = await _hear(app.server.address, item["name"], wav=wav)
            assert " ".join(name) not in " ".join(plain), (item, plain)
            heard = await _hear(app.server.address, item["name"], names, wav=wav)
            assert (" ".join(name) in " ".join(heard)) == check, (item, heard)
        free = await _hear(app.server.address, "", wav=NAME_FREE)
        assert await _hear(app.server.address, "", names, wav=NAME_FREE) == free


async def test_a_clients_names_fix_the_word_it_mishears() -> None:
    async with running_app(MODEL_DIR, slots=2) as app:
        for name, item in MANIFEST.items():
            assert name not in await _hear(app.server.address, name), item  # misheard
            heard = await _hear(app.server.address, name, [name.title()])
            assert name in heard, (item, heard)
        # names given for a command that has none of them change nothing there
        client = await Client.connect(app.server.address)
        try:
            pcm = read_wav(NAME_FREE).data
            plain = final_text(await client.utterance(pcm))
            await client.send(Transcribe(language="en", transcript_names=[AREA["area"]]).event())
            assert final_text(await client.utterance(pcm)) == plain
        finally:
            await client.close()


async def test_names_from_the_setting_are_heard() -> None:
    names = [AREA["area"].capitalize(), DEVICE["device"].capitalize()]
    async with running_app(MODEL_DIR, slots=2, names=names) as app:
        for name in (AREA["name"], DEVICE["name"]):
            heard = await _hear(app.server.address, name)
            assert name in heard, (MANIFEST[name], heard)


async def test_names_from_home_assistant_are_heard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERVISOR_TOKEN", raising=False)
    async with running_fake() as fake:
        fake.add_area(AREA["area"].capitalize())
        entity_id = "switch." + DEVICE["device"].replace(" ", "_")
        fake.add(FakeEntity(entity_id, name="Thing", aliases=[DEVICE["device"].capitalize()]))
        url = f"http://127.0.0.1:{fake.port}"
        async with running_app(MODEL_DIR, slots=2, hass_url=url, hass_token=fake.token) as app:
            assert app.home_assistant is not None
            async with asyncio.timeout(5.0):
                await app.home_assistant.wait_for_version(0)
            for name in (AREA["name"], DEVICE["name"]):
                heard = await _hear(app.server.address, name)
                assert name in heard, (MANIFEST[name], heard)
