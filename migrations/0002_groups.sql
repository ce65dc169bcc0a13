-- Device groups: static groups (explicit member rows) and dynamic groups (a
-- saved filter, resolved against devices at read time; no member rows).
-- docs/groups.md explains the schema and the query plans the indexes serve.

CREATE TABLE device_groups (
    tenant_id    uuid NOT NULL REFERENCES tenants,
    group_id     text COLLATE "C" NOT NULL,
    -- "C" so that the (name, group_id) keyset order is byte-wise and the same
    -- whatever the server's locale.
    name         text COLLATE "C" NOT NULL CHECK (name <> ''),
    description  text NOT NULL DEFAULT '',
    group_type   text NOT NULL CHECK (group_type IN ('STATIC', 'DYNAMIC')),
    -- The filter in canonical form (server/groups/filters.py canonical_json),
    -- so equal filters are equal jsonb values. Present exactly for dynamic
    -- groups.
    query_filter jsonb CHECK (jsonb_typeof(query_filter) = 'object'),
    version      bigint NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, group_id),
    CHECK ((group_type = 'DYNAMIC') = (query_filter IS NOT NULL)),
    -- The target of the members' foreign key below, which pins the type.
    UNIQUE (tenant_id, group_id, group_type)
);
-- ListGroups pages in (name, group_id) order.
CREATE INDEX device_groups_by_name ON device_groups (tenant_id, name, group_id);

-- Members of static groups. group_type is part of the key to the group and
-- can only be 'STATIC', so the database itself refuses member rows for a
-- dynamic group.
CREATE TABLE device_group_members (
    tenant_id  uuid NOT NULL,
    group_id   text COLLATE "C" NOT NULL,
    group_type text NOT NULL DEFAULT 'STATIC' CHECK (group_type = 'STATIC'),
    device_id  text COLLATE "C" NOT NULL,
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, group_id, device_id),
    FOREIGN KEY (tenant_id, group_id, group_type)
        REFERENCES device_groups (tenant_id, group_id, group_type) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE
);
-- Serves the foreign key from devices (a device's memberships).
CREATE INDEX device_group_members_device ON device_group_members (tenant_id, device_id);

-- Keyset pages of a status filter ("online devices ...") in device_id order:
-- status leads so one status is one contiguous, already ordered range, and
-- the scan stops after a page's worth of matches instead of sorting them all.
CREATE INDEX device_state_status ON device_state (tenant_id, status, device_id);

ALTER TABLE device_groups ENABLE ROW LEVEL SECURITY;
ALTER TABLE device_groups FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON device_groups
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

ALTER TABLE device_group_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE device_group_members FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON device_group_members
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());

GRANT SELECT, INSERT, UPDATE, DELETE ON device_groups TO pulse_app;
GRANT SELECT, INSERT, DELETE ON device_group_members TO pulse_app;
