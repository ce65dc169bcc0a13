-- ListGroupMembers reads a dynamic group's maintained membership and skips
-- the devices with queued changes by probing the queue per member
-- (server/groups/store.py, docs/groups.md "Reading from the maintained
-- membership").
CREATE INDEX membership_changes_device ON membership_changes (tenant_id, device_id);
