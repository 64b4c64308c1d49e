"""Bad input and abuse on a live `rtpipe serve`: whatever one client sends (random kinds and payloads,
text frames, garbage Opus, oversized messages), it gets 0x05 errors, is closed (1008) after repeated
abuse, and nothing else is touched: another client keeps getting all its audio, the server stays up.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serve_support import ChatClient, ClientInThread, ServeProcess, run, speech, until

MAX_MESSAGE_BYTES = 65_536  # network.edge's default
ABUSE_LIMIT = 10  # network.edge's default: bad messages before the close


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeProcess(tmp_path_factory.mktemp("serve"), sessions=2) as serve:
        yield serve


def test_one_garbage_message_costs_that_message_not_the_session(server):
    async def talk():
        client = await ChatClient.connect(server.url())
        client.stream(speech())
        await client.wait_handshake()
        await until(lambda: client.count(0x01) >= 5, 30, "audio")
        await client.ws.send_bytes(b"\x01" + b"this is not an Ogg page" * 4)
        heard_before = client.count(0x01)
        await asyncio.sleep(2.0)  # it keeps talking, properly
        await until(lambda: client.count(0x01) >= heard_before + 15, 30, "audio after the bad message")
        closed, errors = client.closed, client.count(0x05)
        await client.close()
        return closed, errors

    closed, errors = run(talk())
    assert not closed
    assert 1 <= errors <= 2  # the bad message, or the next page the reader choked on


# one message of abuse: (what to send, whether the protocol forbids it for sure)
forbidden = st.one_of(
    st.tuples(st.integers(0x08, 0xFF), st.binary(max_size=64)).map(lambda kp: (bytes([kp[0]]) + kp[1], True)),
    st.just((b"", True)),
    st.just((b"\x01", True)),
    st.text(max_size=40).map(lambda t: (t, True)),
    st.integers(MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES).map(lambda n: (b"\x01" + bytes(n), True)),
)
maybe = st.one_of(
    st.binary(min_size=1, max_size=200).map(lambda b: (b, False)),  # any kind: skipped, refused or garbage audio
    st.binary(min_size=1, max_size=400).map(lambda b: (b"\x01" + b, False)),  # garbage Opus
    st.binary(max_size=100).map(lambda b: (b"\x01OggS" + b, False)),  # a page header, then anything
)
abuse = st.lists(st.one_of(forbidden, maybe), min_size=1, max_size=16)


def test_abuse_from_one_client_touches_nobody_else(server):
    good_thread = ClientInThread(server.url())
    good = good_thread.start()
    examples = []

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(messages=abuse)
    @example(messages=[(b"\xff", True)] * 12)  # always one that abuses past the limit, whatever is drawn
    def abuser(messages):
        examples.append(run(abuse_once(server.url(), messages), timeout_s=60))

    try:
        abuser()
        sent_during = good.sent_frames
        closed_during = good.closed
        assert server.process.poll() is None, server.log()
    finally:
        good = good_thread.stop()

    assert not closed_during
    assert good.count(0x05) == 0
    assert all(0 <= k <= 0x07 for k in good.kinds())
    # all its audio came back: one answer per frame it sent, but for the few still on their way
    assert good.count(0x01) >= sent_during - 8, (good.count(0x01), sent_during)
    assert any(closed for closed, _, _ in examples), "no example abused enough to be closed"


async def abuse_once(url: str, messages: list[tuple[bytes | str, bool]]) -> tuple[bool, int, int]:
    """Sends `messages` as fast as it can; checks what came back; (closed, errors, forbidden sent)."""
    client = await ChatClient.connect(url)
    sent_forbidden = 0
    for data, is_forbidden in messages:
        if client.closed or client.ws.closed:
            break
        try:
            if isinstance(data, str):
                await client.ws.send_str(data)
            else:
                await client.ws.send_bytes(data)
        except (ConnectionError, RuntimeError):
            break
        sent_forbidden += is_forbidden
        await asyncio.sleep(0.03)  # a few seconds of abuse in all, while the other client talks
    expected = min(sent_forbidden, ABUSE_LIMIT)
    try:
        await until(lambda: client.count(0x05) >= expected or client.closed, 20, f"{expected} errors")
        if sent_forbidden >= ABUSE_LIMIT:
            await client.wait_closed(20)
    finally:
        closed, code, errors = client.closed, client.close_code, client.count(0x05)
        await client.close()
    assert all(0 <= k <= 0x07 for k in client.kinds()), sorted(set(client.kinds()))
    assert errors >= expected
    if closed:
        assert code == aiohttp.WSCloseCode.POLICY_VIOLATION, code
        assert errors >= ABUSE_LIMIT
    return closed, errors, sent_forbidden
