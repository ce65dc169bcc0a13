-- Rollouts (docs/rollouts.md): a desired-state merge patch applied to the
-- devices of a target at a controlled rate, by the rollout engine
-- (server/rollouts/engine.py), which any number of processes may run.
--
-- A rollout's row is its lease: the engine works on a rollout only inside a
-- transaction holding the row's lock (FOR UPDATE SKIP LOCKED), and every
-- write of that work (the devices' desired states, their outbox rows, their
-- states here, the rate's bookkeeping) commits with it or not at all. So a
-- killed engine leaves each device exactly as before or after its write,
-- and two engines never work on one rollout at once.

CREATE TABLE rollouts (
    tenant_id     uuid NOT NULL REFERENCES tenants,
    rollout_id    text COLLATE "C" NOT NULL,
    description   text NOT NULL DEFAULT '',
    -- Exactly one target: a group (static or dynamic, re-read whenever
    -- devices start) or a filter (canonical JSON, as a dynamic group's).
    target_group_id text COLLATE "C",
    target_filter   jsonb CHECK (jsonb_typeof(target_filter) = 'object'),
    patch         jsonb NOT NULL CHECK (jsonb_typeof(patch) = 'object'),
    max_per_minute integer NOT NULL CHECK (max_per_minute >= 0),
    canary_count  integer NOT NULL CHECK (canary_count >= 0),
    device_timeout interval NOT NULL CHECK (device_timeout > interval '0'),
    abort_threshold_percent double precision
        CHECK (abort_threshold_percent BETWEEN 0 AND 100),
    abort_min_count integer NOT NULL CHECK (abort_min_count >= 1),
    failure_path  text NOT NULL DEFAULT '',
    continuous    boolean NOT NULL,
    state         text NOT NULL DEFAULT 'RUNNING' CHECK (state IN (
                      'RUNNING', 'PAUSED', 'SUCCEEDED', 'ABORTED', 'CANCELLED')),
    state_reason  text NOT NULL DEFAULT '',
    created_by    text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    -- The rate: devices started since rate_since (the start or the last
    -- resume). Starting n more is allowed while
    -- started_since + n <= 1 + floor(seconds since rate_since * max_per_minute / 60).
    rate_since    timestamptz NOT NULL DEFAULT now(),
    started_since bigint NOT NULL DEFAULT 0,
    -- When the engine looks at it next.
    next_check_at timestamptz NOT NULL DEFAULT now(),
    -- A continuous rollout enrols the target's new devices from then on.
    next_enrol_at timestamptz NOT NULL DEFAULT now(),
    -- Written devices are judged in passes over them in device_id order,
    -- a slice per tick (tens of thousands may be waiting for their devices):
    -- a pass begins a check interval after the last one ended (judged_at)
    -- and has judged up to judged_through ('' between passes).
    judged_at      timestamptz NOT NULL DEFAULT 'epoch',
    judged_through text NOT NULL DEFAULT '',
    -- How many of its devices are in each state (kept by the trigger below).
    pending    bigint NOT NULL DEFAULT 0,
    applied    bigint NOT NULL DEFAULT 0,
    succeeded  bigint NOT NULL DEFAULT 0,
    failed     bigint NOT NULL DEFAULT 0,
    timed_out  bigint NOT NULL DEFAULT 0,
    skipped    bigint NOT NULL DEFAULT 0,
    superseded bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, rollout_id),
    CHECK ((target_group_id IS NULL) <> (target_filter IS NULL))
);
-- ListRollouts: newest first.
CREATE INDEX rollouts_by_age ON rollouts (tenant_id, created_at DESC, rollout_id);
CREATE INDEX rollouts_by_group ON rollouts (tenant_id, target_group_id, created_at DESC, rollout_id)
    WHERE target_group_id IS NOT NULL;
-- The engine's work: rollouts starting devices, or waiting for outcomes.
CREATE INDEX rollouts_due ON rollouts (next_check_at) WHERE state = 'RUNNING' OR applied > 0;

-- No foreign key to devices: a deleted device's row stays, SKIPPED.
CREATE TABLE rollout_devices (
    tenant_id       uuid NOT NULL,
    rollout_id      text COLLATE "C" NOT NULL,
    device_id       text COLLATE "C" NOT NULL,
    state           text NOT NULL DEFAULT 'PENDING' CHECK (state IN (
                        'PENDING', 'APPLIED', 'SUCCEEDED', 'FAILED', 'TIMED_OUT', 'SKIPPED',
                        'SUPERSEDED')),
    canary          boolean NOT NULL DEFAULT false,
    -- The desired version the rollout wrote.
    desired_version bigint NOT NULL DEFAULT 0,
    -- The twin revision last evaluated, so that an unchanged twin is not
    -- read again.
    seen_revision   bigint NOT NULL DEFAULT -1,
    deadline        timestamptz,
    detail          text NOT NULL DEFAULT '',
    applied_at      timestamptz,
    ended_at        timestamptz,
    -- Set from rollout_changes at every change of state, by a transaction
    -- holding the rollout's row lock: per rollout, later commits have
    -- higher values, so WatchRollout reads "changed after c" from it.
    change_seq      bigint,
    PRIMARY KEY (tenant_id, rollout_id, device_id),
    FOREIGN KEY (tenant_id, rollout_id) REFERENCES rollouts ON DELETE CASCADE
);
CREATE INDEX rollout_devices_by_state ON rollout_devices (tenant_id, rollout_id, state, device_id);
CREATE SEQUENCE rollout_changes;
CREATE INDEX rollout_devices_changes ON rollout_devices (tenant_id, rollout_id, change_seq)
    WHERE change_seq IS NOT NULL;

-- The counts. Statement-level, so that a tick moving 500 devices updates
-- the rollout's row once.
CREATE FUNCTION rollout_counts() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE rollouts r
        SET pending = r.pending + n.c
        FROM (SELECT tenant_id, rollout_id, count(*) AS c FROM new_rows
              WHERE state = 'PENDING' GROUP BY 1, 2) n
        WHERE r.tenant_id = n.tenant_id AND r.rollout_id = n.rollout_id;
        RETURN NULL;
    END IF;
    WITH moves AS (
        SELECT tenant_id, rollout_id, state, 1 AS d FROM new_rows
        UNION ALL
        SELECT tenant_id, rollout_id, state, -1 FROM old_rows
    ), sums AS (
        SELECT tenant_id, rollout_id,
               sum(d) FILTER (WHERE state = 'PENDING') AS pending,
               sum(d) FILTER (WHERE state = 'APPLIED') AS applied,
               sum(d) FILTER (WHERE state = 'SUCCEEDED') AS succeeded,
               sum(d) FILTER (WHERE state = 'FAILED') AS failed,
               sum(d) FILTER (WHERE state = 'TIMED_OUT') AS timed_out,
               sum(d) FILTER (WHERE state = 'SKIPPED') AS skipped,
               sum(d) FILTER (WHERE state = 'SUPERSEDED') AS superseded
        FROM moves GROUP BY 1, 2
    )
    UPDATE rollouts r
    SET pending = r.pending + coalesce(s.pending, 0),
        applied = r.applied + coalesce(s.applied, 0),
        succeeded = r.succeeded + coalesce(s.succeeded, 0),
        failed = r.failed + coalesce(s.failed, 0),
        timed_out = r.timed_out + coalesce(s.timed_out, 0),
        skipped = r.skipped + coalesce(s.skipped, 0),
        superseded = r.superseded + coalesce(s.superseded, 0)
    FROM sums s
    WHERE r.tenant_id = s.tenant_id AND r.rollout_id = s.rollout_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER rollout_counts_insert
    AFTER INSERT ON rollout_devices REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rollout_counts();
CREATE TRIGGER rollout_counts_update
    AFTER UPDATE ON rollout_devices REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rollout_counts();

ALTER TABLE rollouts ENABLE ROW LEVEL SECURITY;
ALTER TABLE rollouts FORCE ROW LEVEL SECURITY;
ALTER TABLE rollout_devices ENABLE ROW LEVEL SECURITY;
ALTER TABLE rollout_devices FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON rollouts
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY tenant_isolation ON rollout_devices
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
-- The engine finds the rollouts with work across tenants, then works on
-- each in its tenant's scope.
CREATE POLICY evaluator_fleet_read ON rollouts FOR SELECT TO pulse_evaluator USING (true);

GRANT SELECT, INSERT, UPDATE ON rollouts TO pulse_app;
GRANT SELECT, INSERT, UPDATE ON rollout_devices TO pulse_app;
GRANT USAGE ON SEQUENCE rollout_changes TO pulse_app;
GRANT SELECT (tenant_id, rollout_id, state, applied, next_check_at) ON rollouts TO pulse_evaluator;
