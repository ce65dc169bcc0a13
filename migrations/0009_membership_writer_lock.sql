-- Device writes that could not see a group (docs/groups.md, "How events are made").
--
-- The journal triggers queue a device's change only when its tenant has a
-- (dynamic) group, or a group filtering by last seen. A write whose trigger
-- ran before the tenant's first such group committed queued nothing, and the
-- maintainer's evaluation of the new group could still miss it when the
-- write committed after the maintainer's snapshot: the membership kept the
-- device's old state until its next change, and its events never came.
--
-- So the triggers take a per-tenant lock shared, before they read
-- device_groups, and creating a dynamic group or changing its filter takes
-- it exclusively. The group's transaction waits for the writes in flight,
-- which the maintainer will then see, and writes after it wait for its
-- commit, and then see the group (a statement in a PL/pgSQL function takes
-- a new snapshot under READ COMMITTED, the isolation of every device write).
-- Keyed (28782, one of 64 buckets of tenants), not one key per tenant: the
-- evaluator's statements span many tenants, and every key held stays in the
-- shared lock table (max_locks_per_transaction) until the commit. Tenants
-- sharing a bucket only wait for each other's group edits.

CREATE FUNCTION membership_lock_key(tenant uuid) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT get_byte(uuid_send(tenant), 15) & 63 $$;

CREATE OR REPLACE FUNCTION membership_journal_state() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- Before reading device_groups: see the header.
    PERFORM pg_advisory_xact_lock_shared(28782, membership_lock_key(t))
    FROM (SELECT DISTINCT tenant_id FROM new_rows) AS w (t);
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

CREATE OR REPLACE FUNCTION membership_journal_devices() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- Before reading device_groups: see the header.
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_advisory_xact_lock_shared(28782, membership_lock_key(t))
        FROM (SELECT DISTINCT tenant_id FROM old_rows) AS w (t);
    ELSE
        PERFORM pg_advisory_xact_lock_shared(28782, membership_lock_key(t))
        FROM (SELECT DISTINCT tenant_id FROM new_rows) AS w (t);
    END IF;
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

CREATE OR REPLACE FUNCTION membership_journal_group() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.group_type = 'DYNAMIC'
       AND (TG_OP = 'INSERT' OR NEW.query_filter IS DISTINCT FROM OLD.query_filter) THEN
        -- Waits for the tenant's device writes that may not have seen this
        -- group, and holds back new ones until it commits: see the header.
        PERFORM pg_advisory_xact_lock(28782, membership_lock_key(NEW.tenant_id));
        INSERT INTO membership_changes (tenant_id, group_id, cause)
        VALUES (NEW.tenant_id, NEW.group_id, 'GROUP_EDIT');
    END IF;
    RETURN NULL;
END
$$;
