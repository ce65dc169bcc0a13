-- The connectivity log (docs/connectivity.md): an append-only table of
-- CONNECTED / DISCONNECTED / CONNECTION_LOST events, and the role the
-- evaluator's fleet-wide liveness statements run as.

-- pulse_evaluator: the evaluator's sweep and heartbeat flush are single
-- statements across every tenant, which tenant-scoped pulse_app cannot run.
-- Rather than BYPASSRLS (every table, cluster-wide), it gets explicit
-- policies on the three tables it touches, and column grants for exactly what
-- it reads and writes. Like pulse_app it cannot log in; the evaluator's login
-- enters it per transaction with SET LOCAL ROLE.
DO $$
BEGIN
    CREATE ROLE pulse_evaluator NOLOGIN NOSUPERUSER NOBYPASSRLS;
EXCEPTION WHEN duplicate_object THEN
    NULL;  -- roles are cluster-wide; another database created it already
END
$$;

DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT pulse_evaluator TO %I', current_user);
    END IF;
END
$$;

CREATE TABLE connection_events (
    event_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       uuid NOT NULL,
    -- No foreign key to devices: every insert derives its rows from the
    -- device_state row it just changed, in the same statement, so the device
    -- exists by construction, and a per-row key check would be most of the
    -- cost of a 10,000-device sweep.
    device_id       text COLLATE "C" NOT NULL,
    event_type      text NOT NULL
                    CHECK (event_type IN ('CONNECTED', 'DISCONNECTED', 'CONNECTION_LOST')),
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    previous_status text NOT NULL
                    CHECK (previous_status IN ('ONLINE', 'STALE', 'OFFLINE', 'UNKNOWN')),
    status          text NOT NULL CHECK (status IN ('ONLINE', 'STALE', 'OFFLINE', 'UNKNOWN')),
    trigger         text NOT NULL CHECK (trigger IN (
                        'heartbeat_resumed', 'status_online', 'status_offline',
                        'last_will', 'heartbeat_timeout', 'first_seen')),
    details         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    -- The inserting transaction's id. Event ids come from a sequence at
    -- insert time, so they do not follow commit order; watch streams instead
    -- deliver in (xact, event_id) order and only events whose transaction is
    -- older than every transaction still running, an order in which nothing
    -- can ever be inserted behind a reader (docs/connectivity.md). Service
    -- roles have no INSERT grant on this column, so it is always the default.
    xact            bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    CHECK (previous_status <> status)
);

-- ListConnectionEvents: newest first, for the tenant or for one device.
CREATE INDEX connection_events_tenant_time
    ON connection_events (tenant_id, occurred_at DESC, event_id DESC);
CREATE INDEX connection_events_device_time
    ON connection_events (tenant_id, device_id, occurred_at DESC, event_id DESC);
-- Watch streams: the tenant's events in delivery order.
CREATE INDEX connection_events_tenant_xact ON connection_events (tenant_id, xact, event_id);
-- Retention deletes by age across tenants. Rows arrive in time order, so a
-- BRIN index finds old ones for a few pages of index.
CREATE INDEX connection_events_age ON connection_events USING brin (occurred_at);

-- The sweep's only read: ONLINE devices by last_seen_at. The partial index
-- holds just the online devices, so an idle sweep is one short index probe
-- and a sweep's cost follows the number of devices that went stale.
CREATE INDEX device_state_online_last_seen ON device_state (last_seen_at)
    WHERE status = 'ONLINE';

-- Append-only, in the database: service roles are granted INSERT and SELECT
-- only, and this trigger refuses UPDATE, DELETE and TRUNCATE by anyone but
-- the table's owner (which runs the retention job), even if a grant is added
-- by mistake. It fires once per statement, so retention's batched deletes do
-- not pay a per-row check.
CREATE FUNCTION connection_events_append_only() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF current_user <> (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = TG_RELID) THEN
        RAISE EXCEPTION 'connection events are append-only: % is not allowed', TG_OP
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'old events are removed only by the owner''s retention job';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON connection_events
    FOR EACH STATEMENT EXECUTE FUNCTION connection_events_append_only();

ALTER TABLE connection_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE connection_events FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON connection_events
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

-- The evaluator's fleet-wide policies. Permissive policies are OR-ed, so for
-- pulse_evaluator these open the whole table, for pulse_app nothing changes.
CREATE POLICY evaluator_fleet_insert ON connection_events FOR INSERT TO pulse_evaluator
    WITH CHECK (true);
-- INSERT ... RETURNING reads the new rows back.
CREATE POLICY evaluator_fleet_read ON connection_events FOR SELECT TO pulse_evaluator
    USING (true);
CREATE POLICY evaluator_fleet ON device_state FOR ALL TO pulse_evaluator
    USING (true) WITH CHECK (true);
CREATE POLICY evaluator_fleet ON devices FOR SELECT TO pulse_evaluator
    USING (true);

-- Retention runs as the owner, which forced RLS binds too; it may read and
-- delete every tenant's rows (it could drop the policies anyway).
DO $$
BEGIN
    EXECUTE format(
        'CREATE POLICY owner_retention_read ON connection_events FOR SELECT TO %I USING (true)',
        current_user);
    EXECUTE format(
        'CREATE POLICY owner_retention_delete ON connection_events FOR DELETE TO %I USING (true)',
        current_user);
END
$$;

-- The API only reads events. The evaluator inserts them (every column but
-- event_id, an identity, and xact, which must be the inserting transaction)
-- and reads back what it inserted.
GRANT SELECT ON connection_events TO pulse_app, pulse_evaluator;
GRANT INSERT (tenant_id, device_id, event_type, occurred_at, previous_status, status,
              trigger, details)
    ON connection_events TO pulse_evaluator;

GRANT USAGE ON SCHEMA public TO pulse_evaluator;
GRANT SELECT (tenant_id, device_id, status, last_seen_at),
      UPDATE (status, last_seen_at)
    ON device_state TO pulse_evaluator;
GRANT SELECT (tenant_id, device_id, lifecycle) ON devices TO pulse_evaluator;
