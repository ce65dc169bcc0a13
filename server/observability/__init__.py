"""What an operator sees of a running process: Prometheus metrics, log
events, and the HTTP health and readiness endpoints."""
