"""HTTPS upstreams are verified; the proxy can terminate TLS itself."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import trustme

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import quick_start, resolve
from proxy.config.upstreams import Deployment, Model
from tests.support.inproc import MakeProxy, with_server

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[FakeUpstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    async with FakeUpstream(ssl_context=context) as up:
        yield up


def one_model(upstream: FakeUpstream, ca_file: str | None) -> cfg.Config:
    deployment = Deployment(base_url=upstream.url, ca_file=ca_file)
    return resolve(cfg.Config(models=[Model(name="*", deployments=[deployment])]))


async def test_https_upstream_with_its_ca_configured(
    make_proxy: MakeProxy, tls_upstream: FakeUpstream, ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = await make_proxy(one_model(tls_upstream, str(ca_file)))
    assert tls_upstream.url.startswith("https://")
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        for _ in range(5):
            reply = await client.chat.completions.create(model="m", messages=MESSAGES)
            assert reply.choices[0].message.content
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert len([c async for c in stream]) == 10
    assert len(tls_upstream.peers()) == 1  # pooled like plain HTTP


async def test_untrusted_upstream_certificate_is_refused(
    make_proxy: MakeProxy, tls_upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(one_model(tls_upstream, None))  # system trust store only
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "TLS" in caught.value.message
    assert tls_upstream.received == []  # nothing was sent


async def test_proxy_terminates_tls(
    make_proxy: MakeProxy, upstream: FakeUpstream, ca: trustme.CA, tmp_path: Path
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    config = with_server(
        quick_start(upstream.url, None), tls_cert=str(cert_file), tls_key=str(key_file)
    )
    proxy = await make_proxy(config)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    https = proxy.url.replace("http://", "https://")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            https + "/v1/chat/completions", data=b'{"model": "m"}', ssl=client_context
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 8
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.post(https + "/v1/chat/completions", data=b'{"model": "m"}')
