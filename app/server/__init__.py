"""The OpenAI-compatible HTTP server (`llmapp serve`)."""
