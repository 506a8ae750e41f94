"""Profiles, the hardware catalog, the cluster simulator and the planner that sizes pools with them."""
