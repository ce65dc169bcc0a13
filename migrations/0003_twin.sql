-- Device twins. The documents and their versions are already columns of
-- device_state (0001); this adds what watching and publishing need.
-- docs/twin.md explains the design.

-- Grows by one on every change of a device's twin, desired or reported. A
-- row's updates are serialised by its row lock, so per device the revision
-- only ever grows in commit order: WatchTwin resumes from it, per device.
ALTER TABLE device_state
    ADD COLUMN twin_revision bigint NOT NULL DEFAULT 0 CHECK (twin_revision >= 0);

-- The transactional outbox: a row is inserted in the same transaction as
-- every committed desired write, so "published" can never run ahead of
-- "committed", and a process that dies between commit and publish leaves
-- the row behind for the next drain. The evaluator's publisher reads the
-- device's current desired document when it drains (a retained topic only
-- ever needs the latest), publishes it, then deletes the rows.
CREATE TABLE twin_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       uuid NOT NULL,
    device_id       text COLLATE "C" NOT NULL,
    desired_version bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Row-level security is enabled but deliberately not FORCED: pulse_app (the
-- API) may only add rows for its own tenant, while the table owner, which
-- the evaluator's drain connects as, sees the queue of every tenant. The
-- rows hold only ids and versions; documents are still read per tenant,
-- under the forced policies of device_state.
ALTER TABLE twin_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON twin_outbox
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

GRANT INSERT ON twin_outbox TO pulse_app;
