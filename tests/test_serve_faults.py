"""Faults under `rtpipe serve`: a model stage SIGKILLed mid-conversation is restarted while the client's
connection stays open (it hears a gap, then audio again; its session report counts the restart and the
frames it lost); a SIGKILLed network edge is restarted and
clients connect again; SIGTERM closes every client's socket (one that never answers a close holds up
nobody) and leaves no shared memory behind. The tests run in order on one server; the last one stops it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
from serve_support import ChatClient, ServeProcess, run, speech, until, websocket_upgrade


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # --port 0: the port it chose is the one a restarted network edge listens on again
    with ServeProcess(tmp_path_factory.mktemp("serve"), sessions=2, port=0) as serve:
        yield serve


def test_a_model_stage_killed_mid_conversation_is_restarted_and_the_client_stays(server):
    async def talk():
        client = await ChatClient.connect(server.url())
        client.stream(speech())
        await client.wait_handshake()
        await until(lambda: client.count(0x01) >= 10, 30, "audio before the kill")
        lm = server.stage_pid("lm")
        assert lm is not None
        os.kill(lm, signal.SIGKILL)
        await until(lambda: server.stage_pid("lm") not in (None, lm), 60, "a new lm process")
        await until(lambda: "stage lm restarted" in server.log(), 60, "the lm to be ready again")
        restarted_at = time.monotonic()
        await until(lambda: client.count(0x01, since_s=restarted_at) >= 15 or client.closed, 60, "audio after")
        closed = client.closed
        await until(lambda: client.client_id() is not None, 30, "a 0x04 report naming the client")
        await client.close()
        return closed, client.client_id()

    closed, client_id = run(talk())
    assert closed is False, server.log()
    # its report says what it lost (the rings keep waiting frames across a restart: often none, at most
    # the frame the killed stage held) and that the stage restarted
    report = server.report(client_id)
    (row,) = report["sessions"].values()
    assert report["frames_lost"] == row["frames_lost"] <= 2, (report["frames_lost"], row)
    assert report["stages"]["lm"]["restarts"] == 1


def test_a_killed_network_edge_is_restarted_and_clients_connect_again(server):
    async def talk():
        client = await ChatClient.connect(server.url())
        client.stream(speech())
        await client.wait_handshake()
        edge = server.stage_pid("capture")
        assert edge is not None
        os.kill(edge, signal.SIGKILL)
        await client.wait_closed(30)  # its socket died with the edge
        await client.close()
        await until(lambda: server.stage_pid("capture") not in (None, edge), 60, "a new network edge")
        deadline = time.monotonic() + 60
        while True:  # a client reconnects, as Kyutai's web client's user would
            try:
                again = await ChatClient.connect(server.url())
                break
            except aiohttp.ClientError:
                assert time.monotonic() < deadline, "no connection to the restarted edge"
                await asyncio.sleep(0.2)
        again.stream(speech())
        await again.wait_handshake()
        await until(lambda: again.count(0x01) >= 10, 30, "audio from the restarted edge")
        await again.close()

    run(talk())
    assert server.process.poll() is None


def test_sigterm_closes_every_client_and_leaves_no_shared_memory(server):
    async def talk():
        silent = await asyncio.to_thread(websocket_upgrade, server.port)  # never reads: never answers a close
        clients = [await ChatClient.connect(server.url()) for _ in range(3)]  # one talking, two waiting
        for client in clients:
            client.stream(speech())
        await clients[0].wait_handshake()
        assert server.segments()
        server.process.send_signal(signal.SIGTERM)
        for client in clients:
            await client.wait_closed(60)
        codes = [client.close_code for client in clients]
        for client in clients:
            await client.close()
        silent.close()
        return codes

    codes = run(talk())
    assert codes == [aiohttp.WSCloseCode.GOING_AWAY] * 3, codes
    assert server.process.wait(60) == 0, server.log()
    assert server.segments() == []
