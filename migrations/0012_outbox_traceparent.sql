-- The trace of the write that queued a desired-state publication, so that
-- the evaluator's publish continues it (docs/operations.md, "Traces"). The
-- API sets `pulse.traceparent` in its write transactions only while tracing
-- is on; otherwise the column stays NULL and nothing else changes.
ALTER TABLE twin_outbox
    ADD COLUMN traceparent text
    DEFAULT nullif(current_setting('pulse.traceparent', true), '');
