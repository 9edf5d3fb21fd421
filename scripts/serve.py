"""Serve DeepSeek-R1 over an OpenAI-compatible HTTP API (see `python scripts/serve.py --help`); the logic is in dsr1.serve."""

from dsr1.serve.cli import main

if __name__ == "__main__":
    main()
