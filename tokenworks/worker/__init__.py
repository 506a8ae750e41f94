"""One engine in one OS process with a role (prefill, decode or both), speaking msgspec over ZMQ."""
