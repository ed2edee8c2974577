"""The sidecar's Prometheus page, parsed, and one sample looked up by name and labels."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text page, parsed by the client library's own parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with these labels, summed over the labels not named (e.g. ``caller``)."""
    wanted = frozenset(labels.items())
    return sum(v for (sample, have), v in samples.items() if sample == name and wanted <= have)


async def scrape(session: aiohttp.ClientSession, base: str) -> Samples:
    async with session.get(base + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await response.text())
