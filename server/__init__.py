"""The Pulse gRPC API: device registry, twin, groups and connectivity."""
