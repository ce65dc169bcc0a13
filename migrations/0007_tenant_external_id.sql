-- Tenants known by another id at the edge (docs/upstream.md): an identity
-- provider's `tenant_id` claim or the tenant segment of upstream's MQTT
-- topics, such as `acme-industrial`. Inbound, that id maps to our tenant by
-- a pure function (server/tenants.py, tenant_uuid), so no lookup across
-- tenants is needed; this column keeps it for the outbound direction: the
-- topics the service publishes upstream-format desired state on.
ALTER TABLE tenants ADD COLUMN external_id text UNIQUE
    CHECK (external_id ~ '^[^/+#[:cntrl:]]{1,128}$');
