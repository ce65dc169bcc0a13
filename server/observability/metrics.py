"""Every Prometheus metric the processes export, in one module, so the
dashboard (deploy/grafana/pulse.json) and its test can name them.

Multi-process safe: when PROMETHEUS_MULTIPROC_DIR is set (several worker
processes), prometheus-client keeps each process's values in that directory
and `exposition()` adds them up. For that, every gauge here is moved by
inc/dec/set from the code that changes it, never computed by a callback at
scrape time (callbacks only see the process that answers the scrape).

gRPC metrics carry go-grpc-prometheus's names and labels, which existing
dashboards and alerts already query.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # prometheus-client writes there from the first metric defined below on.
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

# The `_created` series of every counter double the output and no dashboard
# here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Seconds, from a cached read (sub-millisecond) to a call near its deadline.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

# gRPC server
GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the call's arrival at the handler chain to its status (streams: their lifetime).",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)

# HTTP gateway
HTTP_REQUESTS = Counter(
    "pulse_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "pulse_http_request_duration_seconds",
    "Time to the response's first byte (an event stream's headers).",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)

# Database pools; `pool` names the part of the process that owns one.
DB_POOL_MAX = Gauge(
    "pulse_db_pool_max_connections",
    "Largest number of connections a pool may open.",
    ["pool"],
    multiprocess_mode="livesum",
)
DB_POOL_IN_USE = Gauge(
    "pulse_db_pool_connections_in_use",
    "Connections handed out and not yet returned.",
    ["pool"],
    multiprocess_mode="livesum",
)
DB_POOL_WAITING = Gauge(
    "pulse_db_pool_waiting",
    "Tasks waiting for a connection.",
    ["pool"],
    multiprocess_mode="livesum",
)
DB_POOL_ACQUIRE_SECONDS = Histogram(
    "pulse_db_pool_acquire_seconds",
    "Time to get a connection from the pool.",
    ["pool"],
    buckets=LATENCY_BUCKETS,
)
DB_RETRIES = Counter(
    "pulse_db_retries_total",
    "Transactions tried again after a transient error, by its kind.",
    ["reason"],
)

# Evaluator: device messages
MQTT_CONNECTED = Gauge(
    "pulse_mqtt_connected",
    "1 while the process's MQTT connection is up.",
    ["client"],
    multiprocess_mode="livesum",
)
MQTT_CONNECTS = Counter(
    "pulse_mqtt_connects_total",
    "MQTT connections established (more than one: reconnects).",
    ["client"],
)
INGEST_MESSAGES = Counter(
    "pulse_ingest_messages_total",
    "Device messages received, by kind (bad_topic: no kind could be read).",
    ["kind"],
)
INGEST_REJECTED = Counter(
    "pulse_ingest_rejected_total",
    "Device messages refused, by kind and reason; none of them changed anything.",
    ["kind", "reason"],
)
INGEST_BATCH_SIZE = Histogram(
    "pulse_ingest_batch_size",
    "Device messages written per batch.",
    ["writer"],
    buckets=_SIZE_BUCKETS,
)
INGEST_COMMIT_SECONDS = Histogram(
    "pulse_ingest_commit_seconds",
    "Time to write and commit one batch.",
    ["writer"],
    buckets=LATENCY_BUCKETS,
)

# Evaluator: desired state out (the twin outbox)
OUTBOX_DEPTH = Gauge(
    "pulse_outbox_depth",
    "Desired writes committed and not yet published to devices.",
    multiprocess_mode="max",
)
OUTBOX_AGE_SECONDS = Gauge(
    "pulse_outbox_oldest_age_seconds",
    "Age of the oldest unpublished desired write (0: none).",
    multiprocess_mode="max",
)
OUTBOX_PUBLISHED = Counter(
    "pulse_outbox_published_total",
    "Desired documents published to devices.",
)

# Evaluator: liveness sweep
SWEEP_SECONDS = Histogram(
    "pulse_liveness_sweep_seconds",
    "Duration of one sweep for silent devices.",
    buckets=LATENCY_BUCKETS,
)
LIVENESS_TRANSITIONS = Counter(
    "pulse_liveness_transitions_total",
    "Connectivity status changes written, by new status.",
    ["status"],
)

# Watch streams
WATCH_STREAMS = Gauge(
    "pulse_watch_streams_open",
    "Server streams (watches) open, by method.",
    ["method"],
    multiprocess_mode="livesum",
)
WATCH_GAPS = Counter(
    "pulse_watch_gaps_total",
    "Watchers that fell behind their queue and were sent back to catch up from the database.",
    ["feed"],
)


def exposition() -> tuple[bytes, str]:
    """The scrape body and its content type: this process's metrics, or
    every worker's when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
    return generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4
