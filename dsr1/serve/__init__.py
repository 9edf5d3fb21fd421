"""An OpenAI-compatible HTTP server over dsr1.engine.engine.Engine (scripts/serve.py; docs/SERVING.md)."""
