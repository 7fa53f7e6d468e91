"""Prometheus metrics and the health check."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobwire.api.auth import hash_token, token_of
from jobwire.api.deps import RuntimeDep
from jobwire.api.schemas import errors
from jobwire.model import Status

router = APIRouter(responses=errors(503))


class _Values(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


@router.get("/healthz")
async def healthz(rt: RuntimeDep) -> dict[str, str]:
    await rt.store.count_by_status()  # proves the database answers
    return {"status": "ok"}


def check_scraper(request: Request, token: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <token>` (any request when
    `token` is None). Hashes are compared, in constant time: no timing leak of the token."""
    if token is None:
        return
    given = token_of(request, allow_query=False) or ""
    if not hmac.compare_digest(hash_token(given), hash_token(token)):
        raise HTTPException(401, "metrics need Authorization: Bearer <JOBWIRE_METRICS_TOKEN>",
                            headers={"WWW-Authenticate": "Bearer"})


@router.get("/metrics", response_class=Response, responses=errors(401))
async def metrics(rt: RuntimeDep, request: Request) -> Response:
    """Every value is read from its source of truth at scrape time. With
    JOBWIRE_METRICS_TOKEN set, only for `Authorization: Bearer <that token>`."""
    check_scraper(request, rt.settings.metrics_token)
    counts = await rt.store.count_by_status()
    jobs = GaugeMetricFamily("jobwire_jobs", "Jobs in the store by status", labels=["status"])
    for status in Status:
        jobs.add_metric([status.value], counts.get(status.value, 0))
    families: list[Metric] = [
        jobs,
        GaugeMetricFamily("jobwire_subscriptions",
                          "Live event subscriptions held by this server",
                          value=rt.hub.subscriptions),
        GaugeMetricFamily("jobwire_subscribed_jobs",
                          "Jobs with at least one live subscription on this server",
                          value=rt.hub.channels),
        CounterMetricFamily("jobwire_events_delivered",
                            "Events delivered to subscribers by this server",
                            value=rt.hub.delivered),
        GaugeMetricFamily("jobwire_worker_running_jobs",
                          "Jobs this process's worker is running",
                          value=len(rt.worker.running) if rt.worker else 0),
    ]
    registry = CollectorRegistry()
    registry.register(_Values(families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
