"""Scraping /metrics as Prometheus would, and the fixtures the metric tests
borrow: the gateway (whose /metrics is this process's, as in `pulse run`)
and the twin tests' evaluator and MQTT client."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import gateway_url, http  # noqa: F401
from tests.twin.conftest import mqtt, retained_cleanup, start_evaluator  # noqa: F401

#: The series a family of each type exposes, by suffix.
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}


@dataclass(frozen=True)
class Scrape:
    #: (sample name, labels, value) of every series.
    samples: list[tuple[str, dict[str, str], float]]
    #: Every series name the families declare, with or without samples yet.
    names: frozenset[str]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the series `name` whose labels include `labels`."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )


async def scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: list[tuple[str, dict[str, str], float]] = []
    names: set[str] = set()
    for family in text_string_to_metric_families(response.text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        samples.extend((s.name, dict(s.labels), s.value) for s in family.samples)
    return Scrape(samples, frozenset(names))
