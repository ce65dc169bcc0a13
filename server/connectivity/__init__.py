"""The connectivity log: liveness transitions, append-only events, listing and watching.

`transitions` holds the evaluator's fleet-wide writes (run as pulse_evaluator),
`store` the tenant-scoped reads, `watch` the per-process fan-out of live
events, `service` the gRPC servicer. docs/connectivity.md explains the design.
"""
