"""Policy: which requests run each step, which KV blocks they own, prefix reuse.

Nothing in this package imports torch; it is tested on tiny pools with exact
block ids.
"""
