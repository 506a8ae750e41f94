"""Moving KV blocks between processes: one small interface, NIXL (UCX) and ZMQ/TCP behind it."""
