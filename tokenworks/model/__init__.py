"""Mechanism: tensors, the network, attention over paged KV, sampling, weight loading.

Nothing here knows about HTTP, routing or scheduling policy.
"""
