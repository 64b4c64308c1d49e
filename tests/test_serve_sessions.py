"""Sessions at `rtpipe serve`: more clients than slots wait first come first served with no handshake,
get one when a slot frees, and past --queue-timeout get a 0x05 and close code 1013; a client that
vanishes mid-frame (no close frame) frees its slot at once.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from serve_support import ChatClient, ServeProcess, masked_binary_frame, run, speech, until, websocket_upgrade

QUEUE_TIMEOUT_S = 6.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeProcess(tmp_path_factory.mktemp("serve"), "--queue-timeout", str(QUEUE_TIMEOUT_S), sessions=2) as serve:
        yield serve


def test_more_clients_than_slots_wait_in_turn_then_time_out_with_1013(server):
    async def talk():
        a = await ChatClient.connect(server.url())
        b = await ChatClient.connect(server.url())
        for client in (a, b):
            client.stream(speech())
            await client.wait_handshake()
        c = await ChatClient.connect(server.url())
        c.stream(speech())
        await asyncio.sleep(0.3)
        d = await ChatClient.connect(server.url())
        d.stream(speech())
        await asyncio.sleep(1.5)
        heard_while_full = (list(c.kinds()), list(d.kinds()))
        await a.close()  # a slot frees: the first in line takes it
        await c.wait_handshake(30)
        d_when_c_went_live = list(d.kinds())
        await d.wait_closed(30)  # no slot for d within the queue timeout
        b_still_talking = not b.closed and b.count(0x01) > 0
        for client in (b, c, d):
            await client.close()
        return heard_while_full, d_when_c_went_live, d, b_still_talking

    (c_heard, d_heard), d_when_c_went_live, d, b_still_talking = run(talk())
    assert c_heard == [] and d_heard == []  # no handshake, nothing at all while waiting
    assert d_when_c_went_live == []
    assert d.kinds() == [0x05], d.kinds()
    assert b"no free slot" in d.heard[0].payload
    assert d.close_code == 1013
    assert b_still_talking


def test_a_client_vanishing_mid_frame_frees_its_slot_at_once(server):
    import sphn

    writer = sphn.OpusStreamWriter(24_000)
    samples = speech()

    async def talk():
        b = await ChatClient.connect(server.url())
        b.stream(speech())
        await b.wait_handshake()
        vanishing = await asyncio.to_thread(websocket_upgrade, server.port)  # the other slot
        for k in range(6):
            ogg = writer.append_pcm(samples[k * 1920 : (k + 1) * 1920])
            await asyncio.to_thread(vanishing.sendall, masked_binary_frame(b"\x01" + ogg))
            await asyncio.sleep(0.08)
        waiting = await ChatClient.connect(server.url())
        waiting.stream(speech())
        await asyncio.sleep(1.0)
        waited_without_handshake = 0x00 not in waiting.kinds()
        frame = masked_binary_frame(b"\x01" + writer.append_pcm(samples[:1920]))
        vanishing.sendall(frame[: len(frame) // 2])  # half a frame, then the socket is gone: a reset, no close
        vanishing.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        vanishing.close()
        await waiting.wait_handshake(30)
        await until(lambda: waiting.count(0x01) >= 3 and b.client_id(), 30, "audio for the client that waited")
        for client in (b, waiting):
            await client.close()
        return waited_without_handshake, b.client_id() + 1  # ids go in order of connection

    waited_without_handshake, vanished_id = run(talk())
    assert waited_without_handshake
    # freed when its socket ended, not by the idle timeout (10 s without a message)
    ended = server.report(vanished_id)["client"]
    assert ended["frames_in"] >= 1
    assert not ended["end_reason"].startswith("idle"), ended["end_reason"]
