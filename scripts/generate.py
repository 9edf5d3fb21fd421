"""Generate text with DeepSeek-R1 (see `python scripts/generate.py --help`); the logic is in dsr1.generate_cli."""

from dsr1.generate_cli import main

if __name__ == "__main__":
    main()
