"""The HTTP producer: jobs API, webhook routes, health and metrics."""
