"""Evaluation adapters. Importing dsr1.eval registers the `dsr1` model with lm-eval (needs `pip install -e '.[eval]'`)."""

from dsr1.eval.lm_eval import DSR1LM

__all__ = ["DSR1LM"]
