"""The front door: OpenAI HTTP API, routing policy, streams."""
