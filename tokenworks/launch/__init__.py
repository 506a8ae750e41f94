"""Starting everything: local worker processes pinned to CPU sets (or GPUs)."""
