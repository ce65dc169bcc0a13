"""The capability handlers the evaluator runs: one line per capability."""

from __future__ import annotations

from evaluator.liveness import Liveness
from evaluator.retained_repair import RetainedRepair
from evaluator.runtime import Handler
from evaluator.twin_ingest import TwinIngest
from evaluator.twin_publisher import TwinPublisher
from server import config, mqtt_url
from server.db import Database


def build(
    db: Database, broker: mqtt_url.BrokerAddress, settings: config.Settings | None = None
) -> list[Handler]:
    """Every handler, sharing one database pool; settings default to the environment's."""
    settings = settings or config.load()
    return [
        Liveness(
            db,
            stale_after_s=settings.liveness_stale_after_s,
            sweep_interval_s=settings.sweep_interval_s,
            flush_s=settings.liveness_flush_s,
            flap_hold_s=settings.liveness_flap_hold_s,
        ),
        TwinIngest(db),
        TwinPublisher(db, upstream=settings.upstream_desired),
        RetainedRepair(
            db, broker, client_id=settings.evaluator_id, upstream=settings.upstream_desired
        ),
    ]
