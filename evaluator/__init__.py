"""The device-facing process: MQTT ingest, liveness sweep, desired-state publishing."""
