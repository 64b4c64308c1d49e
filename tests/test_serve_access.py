"""Who may talk to `rtpipe serve`: with --auth-token-file a client sends the token as a kyutai-api-key
header or an auth_id query parameter, else HTTP 401 before the upgrade; --ssl DIR serves wss with the
certificate there (one the test makes); a non-loopback --host without a token or --no-auth is refused
before anything starts.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys

import aiohttp
import pytest
from serve_support import ChatClient, ServeProcess, run, speech, until

TOKEN = "s3cret-token-for-the-test"


def make_certificate(folder) -> None:
    """A self-signed certificate for 127.0.0.1: folder/cert.pem and folder/key.pem."""
    folder.mkdir()
    key, cert = str(folder / "key.pem"), str(folder / "cert.pem")
    self_signed = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    subprocess.run(
        ["openssl", *self_signed, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    tmp = tmp_path_factory.mktemp("serve")
    make_certificate(tmp / "tls")
    (tmp / "token").write_text(TOKEN + "\n")
    args = ("--ssl", str(tmp / "tls"), "--auth-token-file", str(tmp / "token"))
    with ServeProcess(tmp, *args, sessions=2) as serve:
        serve.ca = ssl.create_default_context(cafile=str(tmp / "tls" / "cert.pem"))
        yield serve


def refused_status(url: str, **kwargs) -> int:
    async def connect():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, **kwargs)
            return refused.value.status

    return run(connect())


def converses(url: str, **kwargs) -> bool:
    async def talk():
        client = await ChatClient.connect(url, **kwargs)
        client.stream(speech())
        await client.wait_handshake()
        await until(lambda: client.samples_heard > 0, 30, "audio back")
        await client.close()
        return True

    return run(talk())


def test_without_the_token_a_client_gets_401_before_the_upgrade(server):
    assert refused_status(server.url(), ssl=server.ca) == 401
    assert refused_status(server.url("auth_id=wrong"), ssl=server.ca) == 401
    assert refused_status(server.url(), ssl=server.ca, headers={"kyutai-api-key": TOKEN[:-1]}) == 401


def test_the_token_as_a_header_or_a_query_parameter_lets_a_client_in(server):
    assert converses(server.url(), ssl=server.ca, headers={"kyutai-api-key": TOKEN})
    assert converses(server.url(f"auth_id={TOKEN}&text_temperature=0.7"), ssl=server.ca)


def test_wss_serves_with_the_certificate_given(server):
    assert server.url().startswith("wss://")
    # a client that trusts nothing but the system's CAs refuses the self-signed certificate
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        refused_status(server.url(f"auth_id={TOKEN}"))
    assert converses(server.url(f"auth_id={TOKEN}"), ssl=False)  # verification off, as Kyutai's client allows


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7"])
def test_a_public_host_without_auth_is_refused_before_anything_starts(host, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "rtpipe.pipeline.cli.main", "serve", "--host", host, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--host" in lines[0] and "--no-auth" in lines[0] and "--auth-token-file" in lines[0]
    assert "serving" not in done.stderr
