"""Secrets never leave: ${VAR} values and headers.set values are absent from
logs, error responses, /config, /reload answers and config errors; callers'
Authorization and Cookie values are never logged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import ConfigError, parse_config
from tests.support.sidecar import SidecarProcess
from tests.support.upstreams import Upstream, unused_port
from tests.support.wire import raw_exchange, status_of
from tests.support.yaml import upstreams_yaml, write_config

ENV_TOKEN = "tok-Env-5ecret-4711"
LITERAL_KEY = "literal-Key-5ecret-0815"
ADMIN_TOKEN = "adm-5ecret-Token-42"
CALLER_AUTH = "caller-Auth-5ecret-1"
CALLER_COOKIE = "caller-Cookie-5ecret-2"
SECRETS = (ENV_TOKEN, LITERAL_KEY, ADMIN_TOKEN, CALLER_AUTH, CALLER_COOKIE)


def _config(upstream_url: str, dead_url: str, **top: Any) -> str:
    return upstreams_yaml(
        {
            "api": {
                "url": upstream_url,
                "headers": {"set": {"Authorization": "Bearer ${API_TOKEN}", "X-Api-Key": LITERAL_KEY}},
            },
            "dead": {
                "url": dead_url,
                "timeouts": {"connect": "1s"},
                "headers": {"set": {"Authorization": "Bearer ${API_TOKEN}"}},
            },
        },
        admin={"listen": "127.0.0.1:0", "token": "${ADMIN_TOKEN}"},
        **top,
    )


def _leaks(text: str, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    return [secret for secret in secrets if secret in text]


async def test_no_secret_in_logs_errors_config_or_reload(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        dead = f"http://127.0.0.1:{unused_port()}"
        path = write_config(tmp_path, _config(upstream.url, dead))
        process = SidecarProcess(
            path,
            env={"API_TOKEN": ENV_TOKEN, "ADMIN_TOKEN": ADMIN_TOKEN},
            extra_args=["--log-level", "debug"],
        )
        await process.start()
        answers: list[str] = []
        try:
            caller = {"Authorization": f"Bearer {CALLER_AUTH}", "Cookie": f"session={CALLER_COOKIE}"}
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with aiohttp.ClientSession() as client:
                for target in ("/api/ok?token=x", "/dead/x", "/nowhere"):
                    async with client.get(process.url + target, headers=caller) as response:
                        answers.append(f"{response.status} {dict(response.headers)} {await response.text()}")
                for target in ("/config", "/pools", "/metrics"):
                    async with client.get(process.admin_url + target, headers=admin) as response:
                        assert response.status == 200
                        answers.append(await response.text())
                # A reload that fails on a value that came from ${API_TOKEN}.
                broken = _config(upstream.url, dead, defaults={"limits": {"max_connections": "${API_TOKEN}"}})
                write_config(tmp_path, broken)
                async with client.post(process.admin_url + "/reload", headers=admin) as response:
                    assert response.status == 400
                    answers.append(await response.text())
            # Malformed requests carrying credentials: the parser error must not quote them.
            for bad in (
                f"GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {CALLER_AUTH}\x00\r\n\r\n",
                f"GET /api/x HTTP/1.1\r\nHost: a\r\nCookie: s={CALLER_COOKIE}\r\n continued\r\n\r\n",
                f"GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {CALLER_AUTH}" + "x" * 9000 + "\r\n\r\n",
            ):
                raw = await raw_exchange(process.proxy_port, bad.encode())
                assert status_of(raw) in (400, 431)
                answers.append(raw.decode("latin-1"))
            await asyncio.sleep(0.3)
        finally:
            await process.stop()

        # The upstream did get the configured credentials (they are meant for it)...
        sent = dict(upstream.requests[0].headers)
        assert sent["Authorization"] == f"Bearer {ENV_TOKEN}"
        assert sent["X-Api-Key"] == LITERAL_KEY
        # ...and nobody else saw any secret.
        log = "\n".join(process.raw)
        assert process.events("access") and process.events("config_reload_failed")
        assert _leaks(log) == [], "a secret reached the log"
        for answer in answers:
            assert _leaks(answer) == [], answer[:300]
        assert "token=x" not in log, "query strings are not logged by default"


def test_config_errors_never_quote_a_secret_value() -> None:
    text = """
    upstreams:
      api:
        url: http://127.0.0.1:9
        limits: { max_connections: "${API_TOKEN}" }
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={"API_TOKEN": ENV_TOKEN})
    assert ENV_TOKEN not in str(caught.value)
    assert "upstreams.api.limits.max_connections" in str(caught.value)
    url_text = """
    upstreams:
      api:
        url: "${API_URL}"
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(url_text, env={"API_URL": f"ftp://{ENV_TOKEN}@x"})
    assert ENV_TOKEN not in str(caught.value)
