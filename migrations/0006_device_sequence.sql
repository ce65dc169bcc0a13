-- Per-device message order (docs/device-ordering.md). Devices may put a
-- sequence number ("seq", strictly increasing across all their messages) in
-- what they publish; these columns remember how far each device's order has
-- been applied, so a message that several evaluators process out of order
-- cannot undo a newer one. NULL: no message with a seq applied yet, which is
-- also what every device that never sends one keeps.

ALTER TABLE device_state
    -- The seq of the reported document stored (twin ingest, as pulse_app).
    ADD COLUMN reported_seq bigint CHECK (reported_seq >= 0),
    -- The seq of the newest status message (online, offline, will) applied:
    -- an older one no longer decides the status.
    ADD COLUMN liveness_seq bigint CHECK (liveness_seq >= 0),
    -- The seq of the last `online` applied: the session a last will must
    -- belong to (a will carries the seq of its session's `online`).
    ADD COLUMN session_seq bigint CHECK (session_seq >= 0);

-- pulse_app's grants on device_state are table-wide (0001), so they cover
-- reported_seq; RLS policies are per row, so nothing changes there.
-- pulse_evaluator has column grants only (0004): it reads and writes the two
-- liveness columns in the same statement as the status.
GRANT SELECT (liveness_seq, session_seq), UPDATE (liveness_seq, session_seq)
    ON device_state TO pulse_evaluator;
