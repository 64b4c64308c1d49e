"""`rtpipe serve` speaks Kyutai's /api/chat protocol: the handshake once the slot is live and before any
audio, nothing above 0x07, text pieces to the client whose slot said them, audio (silence if need be)
while a client is quiet, the web client's query parameters reaching its slot's sampling, and a report per
session. One server for the module: stand-in codecs, a stage saying one text piece per slot and frame
(runtime_support:SessionTalker) and one saying each slot's settings (serve_support:SettingsSayer).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest
from serve_support import ChatClient, ServeProcess, run, speech, until

SETS = (
    "stages.encode.kind=runtime_support:SessionTalker",
    "stages.lm.kind=serve_support:SettingsSayer",
    "stages.decode.kind=codec.pcm",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeProcess(tmp_path_factory.mktemp("serve"), sets=SETS, sessions=2) as serve:
        yield serve


def test_handshake_comes_once_before_any_audio_and_no_kind_is_above_7(server):
    async def talk():
        client = await ChatClient.connect(server.url())
        client.stream(speech())
        await client.wait_handshake()
        await until(lambda: client.count(0x01) >= 10, 30, "ten audio messages")
        await client.close()
        return client

    client = run(talk())
    kinds = client.kinds()
    assert kinds.count(0x00) == 1
    assert kinds.index(0x00) < kinds.index(0x01), kinds[:10]
    assert all(0 <= k <= 0x07 for k in kinds), sorted(set(kinds))
    assert client.samples_heard > 0
    assert not client.non_binary


def test_latency_reports_go_only_to_a_client_that_asks(server):
    # Kyutai's Python client warns on every kind it does not know: it must not hear 0x04 once a second
    async def talk(url):
        client = await ChatClient.connect(url)
        client.stream(speech())
        await client.wait_handshake()
        await until(lambda: client.count(0x01) >= 20, 30, "twenty audio messages (1.6 s)")
        await client.close()
        return client

    quiet = run(talk(server.url(latency=False)))
    asked = run(talk(server.url()))
    assert 0x04 not in quiet.kinds() and quiet.count(0x01) >= 20
    assert asked.client_id() is not None


def test_text_pieces_go_to_the_client_whose_slot_said_them(server):
    async def talk():
        a = await ChatClient.connect(server.url())
        b = await ChatClient.connect(server.url())
        a.stream(speech())
        b.stream(speech()[24_000:])
        await a.wait_handshake()
        await b.wait_handshake()
        await until(lambda: len(a.texts()) > 12 and len(b.texts()) > 12, 30, "text pieces for both clients")
        await a.close()
        await b.close()
        return a, b

    a, b = run(talk())
    said = {}
    for client, name in ((a, "a"), (b, "b")):
        pieces = [t for t in client.texts() if not t.startswith("settings ")]
        matches = [re.fullmatch(r"s(\d)\.(\d+) ", p) for p in pieces]
        assert all(matches), pieces[:5]
        slots = {int(m.group(1)) for m in matches if m}
        assert len(slots) == 1, f"client {name} heard pieces of slots {slots}"
        counts = [int(m.group(2)) for m in matches if m]
        # its own conversation's pieces, in order: none of the slot's previous client
        assert counts == list(range(counts[0], counts[0] + len(counts))), counts[:20]
        said[name] = slots.pop()
    assert said["a"] != said["b"]


def test_audio_keeps_coming_while_a_client_sends_nothing(server):
    async def talk():
        client = await ChatClient.connect(server.url())
        client.stream(speech(), frames=12)
        await client.wait_handshake()
        await client.streamer
        quiet_from = time.monotonic()
        await asyncio.sleep(2.5)  # connected, saying nothing
        heard_quiet = client.count(0x01, since_s=quiet_from + 1.0)
        closed = client.closed
        await client.close()
        return heard_quiet, closed

    heard_quiet, closed = run(talk())
    assert not closed
    assert heard_quiet >= 5, f"{heard_quiet} audio messages in the last 1.5 s of the quiet"


def test_query_parameters_reach_the_slots_sampling(server):
    query = "text_temperature=0.25&text_topk=7&audio_temperature=0.55&audio_topk=99&text_seed=42&audio_seed=43"

    async def talk(query):
        client = await ChatClient.connect(server.url(query))
        client.stream(speech())
        await client.wait_handshake()
        await until(lambda: len(said(client)) >= 3, 30, "the settings pieces")
        await client.close()
        assert len(set(said(client))) == 1, set(said(client))  # only its own conversation's
        return json.loads(said(client)[0][len("settings ") :])

    def said(client):
        return [t for t in client.texts() if t.startswith("settings ")]

    assert run(talk(query)) == {
        "text_temperature": 0.25,
        "text_top_k": 7,
        "audio_temperature": 0.55,
        "audio_top_k": 99,
        "text_seed": 42,
        "audio_seed": 43,
    }
    # the next client in that slot asks nothing: the stages' own settings, not the last client's
    assert set(run(talk("")).values()) == {None}
    assert set(run(talk("")).values()) == {None}


def test_a_bad_query_parameter_is_refused_before_the_upgrade(server):
    async def connect():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(server.url("text_topk=lots"))
            return refused.value.status

    assert run(connect()) == 400


def test_a_session_that_ends_leaves_its_report(server):
    async def talk():
        client = await ChatClient.connect(server.url())
        client.stream(speech(), frames=25)
        await client.wait_handshake()
        await client.streamer
        await until(lambda: client.count(0x01) >= 20 and client.client_id(), 30, "answers and a 0x04 message")
        await client.close()
        return client

    client = run(talk())
    report = server.report(client.client_id())
    assert report["client"]["id"] == client.client_id()
    assert report["client"]["frames_in"] >= 20
    assert report["client"]["frames_out"] >= 20
    assert report["frames"] >= 20
    assert report["client"]["end_reason"] == "client closed"
