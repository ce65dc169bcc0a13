-- MQTT credentials: per device (tenant data, under RLS like the rest) and
-- per service process (evaluator, simulator, ...; not tenant data, so read by
-- the login itself and never by pulse_app).
--
-- Only a scrypt hash of a secret is stored ("scrypt$n$r$p$salt$hash").
-- Revoked credentials are kept, with revoke_time, so a device's page shows its
-- history and a broker's access list can be reconciled against it.

CREATE TABLE device_credentials (
    tenant_id      uuid NOT NULL,
    device_id      text COLLATE "C" NOT NULL,
    credential_id  text COLLATE "C" NOT NULL,
    secret_hash    text NOT NULL,
    create_time    timestamptz NOT NULL DEFAULT now(),
    expire_time    timestamptz,
    last_used_time timestamptz,
    revoke_time    timestamptz,
    PRIMARY KEY (tenant_id, device_id, credential_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE
);
-- What brokers re-check every few seconds: the credentials still active.
CREATE INDEX device_credentials_active ON device_credentials (tenant_id, device_id)
    WHERE revoke_time IS NULL;

ALTER TABLE device_credentials ENABLE ROW LEVEL SECURITY;
ALTER TABLE device_credentials FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON device_credentials
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
GRANT SELECT, INSERT, UPDATE ON device_credentials TO pulse_app;

CREATE TABLE service_credentials (
    name         text COLLATE "C" PRIMARY KEY,
    secret_hash  text NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now()
);
-- No grant to pulse_app: a tenant transaction can never read a service's hash.
