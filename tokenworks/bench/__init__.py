"""Load generation and goodput reports against any OpenAI-compatible server."""
