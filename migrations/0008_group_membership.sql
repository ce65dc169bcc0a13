-- Group membership events (docs/groups.md, "Membership events").
--
-- Membership is still resolved at read time for ListGroupMembers. To tell a
-- watcher that a device ENTERED or LEFT a group, the membership is also kept
-- here as rows, by one writer per tenant (the evaluator's membership
-- maintainer), and every change to those rows is an event:
--
--   writes to devices, device_state, groups, static members
--     --(triggers, same transaction)--> membership_changes (a work queue)
--     --(maintainer: re-evaluate those devices / groups, diff)-->
--       group_memberships (as last evaluated) + membership_events (the diff)
--
-- Because the events are exactly the changes of group_memberships, made
-- under a per-tenant lock, a device's events in a group always alternate
-- ENTERED / LEFT, and replaying them from any cursor needs no state but the
-- cursor. membership_timers re-evaluates devices whose twin sync status
-- turns from PENDING to STALE by the passing of time alone.

CREATE TABLE membership_changes (
    change_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL,
    -- NULL: every device of group_id (the group was created or its filter changed).
    device_id text COLLATE "C",
    -- NULL: every group of the tenant (a device changed).
    group_id  text COLLATE "C",
    cause     text NOT NULL CHECK (cause IN (
                  'STATUS', 'TAGS', 'TWIN', 'ATTRIBUTES', 'LAST_SEEN', 'SYNC_TIMEOUT',
                  'GROUP_EDIT', 'DEVICE_CREATED', 'DEVICE_DECOMMISSIONED', 'DEVICE_DELETED')),
    CHECK (device_id IS NOT NULL OR group_id IS NOT NULL)
);
CREATE INDEX membership_changes_tenant ON membership_changes (tenant_id, change_id);

CREATE TABLE membership_timers (
    tenant_id uuid NOT NULL,
    device_id text COLLATE "C" NOT NULL,
    due_at    timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, device_id)
);
CREATE INDEX membership_timers_due ON membership_timers (due_at);

-- No foreign key to devices: a deleted device's rows must stay until the
-- maintainer has turned them into LEFT events.
CREATE TABLE group_memberships (
    tenant_id uuid NOT NULL,
    group_id  text COLLATE "C" NOT NULL,
    device_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (tenant_id, group_id, device_id),
    FOREIGN KEY (tenant_id, group_id) REFERENCES device_groups ON DELETE CASCADE
);
CREATE INDEX group_memberships_device ON group_memberships (tenant_id, device_id);

-- Delivered in (xact, event_id) order below a horizon, exactly like
-- connection_events (migrations/0004, docs/connectivity.md).
CREATE TABLE membership_events (
    event_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    group_id    text COLLATE "C" NOT NULL,
    device_id   text COLLATE "C" NOT NULL,
    event_type  text NOT NULL CHECK (event_type IN ('ENTERED', 'LEFT')),
    cause       text NOT NULL CHECK (cause IN (
                    'STATUS', 'TAGS', 'TWIN', 'ATTRIBUTES', 'LAST_SEEN', 'SYNC_TIMEOUT',
                    'GROUP_EDIT', 'DEVICE_CREATED', 'DEVICE_DECOMMISSIONED', 'DEVICE_DELETED')),
    occurred_at timestamptz NOT NULL DEFAULT now(),
    xact        bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint)
);
CREATE INDEX membership_events_group ON membership_events (tenant_id, group_id, xact, event_id);
CREATE INDEX membership_events_tenant ON membership_events (tenant_id, xact, event_id);
-- Retention deletes by age (server/connectivity/retention.py).
CREATE INDEX membership_events_age ON membership_events USING brin (occurred_at);

-- The triggers. Statement-level with transition tables, so a batch of 500
-- reports or a sweep of 10,000 devices adds one INSERT ... SELECT, not 500
-- or 10,000. A tenant without groups queues nothing.

CREATE FUNCTION membership_journal_state() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO membership_changes (tenant_id, device_id, cause)
    SELECT n.tenant_id, n.device_id, c.cause
    FROM new_rows n
    JOIN old_rows o USING (tenant_id, device_id)
    CROSS JOIN LATERAL (VALUES
        ('STATUS', n.status IS DISTINCT FROM o.status),
        ('TWIN', (n.twin_revision, n.desired_version, n.reported_version,
                  n.desired_updated_at, n.reported_updated_at)
                 IS DISTINCT FROM
                 (o.twin_revision, o.desired_version, o.reported_version,
                  o.desired_updated_at, o.reported_updated_at)),
        ('LAST_SEEN', n.last_seen_at IS DISTINCT FROM o.last_seen_at
                      AND EXISTS (SELECT 1 FROM device_groups g
                                  WHERE g.tenant_id = n.tenant_id
                                    AND g.query_filter ?| ARRAY['last_seen_before',
                                                                'last_seen_after']))
    ) AS c (cause, changed)
    WHERE c.changed
      AND EXISTS (SELECT 1 FROM device_groups g
                  WHERE g.tenant_id = n.tenant_id AND g.group_type = 'DYNAMIC');
    RETURN NULL;
END
$$;

CREATE TRIGGER membership_journal
    AFTER UPDATE ON device_state REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION membership_journal_state();

CREATE FUNCTION membership_journal_devices() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO membership_changes (tenant_id, device_id, cause)
        SELECT n.tenant_id, n.device_id, 'DEVICE_CREATED' FROM new_rows n
        WHERE EXISTS (SELECT 1 FROM device_groups g WHERE g.tenant_id = n.tenant_id);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO membership_changes (tenant_id, device_id, cause)
        SELECT o.tenant_id, o.device_id, 'DEVICE_DELETED' FROM old_rows o
        WHERE EXISTS (SELECT 1 FROM device_groups g WHERE g.tenant_id = o.tenant_id);
    ELSE
        INSERT INTO membership_changes (tenant_id, device_id, cause)
        SELECT n.tenant_id, n.device_id, c.cause
        FROM new_rows n
        JOIN old_rows o USING (tenant_id, device_id)
        CROSS JOIN LATERAL (VALUES
            ('TAGS', n.tags IS DISTINCT FROM o.tags),
            ('DEVICE_DECOMMISSIONED',
             n.lifecycle = 'DECOMMISSIONED' AND o.lifecycle <> 'DECOMMISSIONED'),
            ('ATTRIBUTES', (n.name, n.site_id, n.model) IS DISTINCT FROM (o.name, o.site_id, o.model)
                           OR (n.lifecycle <> 'DECOMMISSIONED' AND n.lifecycle <> o.lifecycle))
        ) AS c (cause, changed)
        WHERE c.changed
          AND EXISTS (SELECT 1 FROM device_groups g
                      WHERE g.tenant_id = n.tenant_id AND g.group_type = 'DYNAMIC');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER membership_journal_insert
    AFTER INSERT ON devices REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION membership_journal_devices();
CREATE TRIGGER membership_journal_update
    AFTER UPDATE ON devices REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION membership_journal_devices();
CREATE TRIGGER membership_journal_delete
    AFTER DELETE ON devices REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION membership_journal_devices();

-- Static members. Rows removed by a group's own deletion queue nothing: the
-- group's memberships go with it (the cascade above).
CREATE FUNCTION membership_journal_members() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO membership_changes (tenant_id, device_id, group_id, cause)
        SELECT n.tenant_id, n.device_id, n.group_id, 'GROUP_EDIT' FROM new_rows n;
    ELSE
        INSERT INTO membership_changes (tenant_id, device_id, group_id, cause)
        SELECT o.tenant_id, o.device_id, o.group_id, 'GROUP_EDIT' FROM old_rows o
        WHERE EXISTS (SELECT 1 FROM device_groups g
                      WHERE g.tenant_id = o.tenant_id AND g.group_id = o.group_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER membership_journal_insert
    AFTER INSERT ON device_group_members REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION membership_journal_members();
CREATE TRIGGER membership_journal_delete
    AFTER DELETE ON device_group_members REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION membership_journal_members();

-- A dynamic group created or its filter changed: re-evaluate the whole group.
CREATE FUNCTION membership_journal_group() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.group_type = 'DYNAMIC'
       AND (TG_OP = 'INSERT' OR NEW.query_filter IS DISTINCT FROM OLD.query_filter) THEN
        INSERT INTO membership_changes (tenant_id, group_id, cause)
        VALUES (NEW.tenant_id, NEW.group_id, 'GROUP_EDIT');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER membership_journal
    AFTER INSERT OR UPDATE ON device_groups
    FOR EACH ROW EXECUTE FUNCTION membership_journal_group();

-- A deleted group's streams end (NOT_FOUND) at their next read: wake them.
CREATE FUNCTION membership_group_deleted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('pulse_membership_events', OLD.tenant_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER membership_group_deleted
    AFTER DELETE ON device_groups
    FOR EACH ROW EXECUTE FUNCTION membership_group_deleted();

-- Groups that exist already: static ones are copied, dynamic ones queued.
INSERT INTO group_memberships (tenant_id, group_id, device_id)
SELECT tenant_id, group_id, device_id FROM device_group_members;
INSERT INTO membership_changes (tenant_id, group_id, cause)
SELECT tenant_id, group_id, 'GROUP_EDIT' FROM device_groups WHERE group_type = 'DYNAMIC';

ALTER TABLE membership_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE membership_changes FORCE ROW LEVEL SECURITY;
ALTER TABLE membership_timers ENABLE ROW LEVEL SECURITY;
ALTER TABLE membership_timers FORCE ROW LEVEL SECURITY;
ALTER TABLE group_memberships ENABLE ROW LEVEL SECURITY;
ALTER TABLE group_memberships FORCE ROW LEVEL SECURITY;
ALTER TABLE membership_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE membership_events FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON membership_changes
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY tenant_isolation ON membership_timers
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY tenant_isolation ON group_memberships
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY tenant_isolation ON membership_events
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

-- The evaluator's fleet-wide statements (the liveness sweep) fire the
-- device_state trigger for many tenants at once, and the maintainer finds
-- the tenants with work before it enters each of them as pulse_app.
CREATE POLICY evaluator_fleet ON membership_changes FOR ALL TO pulse_evaluator
    USING (true) WITH CHECK (true);
CREATE POLICY evaluator_fleet ON membership_timers FOR SELECT TO pulse_evaluator
    USING (true);
CREATE POLICY evaluator_fleet_read ON device_groups FOR SELECT TO pulse_evaluator
    USING (true);

-- The owner (the migrating login) deletes devices in maintenance, and the
-- triggers then queue changes for every tenant.
DO $$
BEGIN
    EXECUTE format(
        'CREATE POLICY owner_maintenance ON membership_changes TO %I USING (true) WITH CHECK (true)',
        current_user);
    -- `pulse retention` removes old events as the owner.
    EXECUTE format(
        'CREATE POLICY owner_retention ON membership_events FOR ALL TO %I USING (true)',
        current_user);
END
$$;

GRANT SELECT, INSERT, DELETE ON membership_changes TO pulse_app, pulse_evaluator;
GRANT SELECT, INSERT, UPDATE, DELETE ON membership_timers TO pulse_app;
GRANT SELECT ON membership_timers TO pulse_evaluator;
GRANT SELECT, INSERT, DELETE ON group_memberships TO pulse_app;
GRANT SELECT ON membership_events TO pulse_app;
GRANT INSERT (tenant_id, group_id, device_id, event_type, cause) ON membership_events TO pulse_app;
GRANT SELECT (tenant_id, group_id, group_type, query_filter) ON device_groups TO pulse_evaluator;
