"""The `lm_eval` command with `--model dsr1` registered (lm-eval 0.4.13 has no plugin mechanism for models).

Takes exactly lm_eval's arguments, e.g.
    python evals/run_lm_eval.py --model dsr1 --model_args ckpt_path=/ckpt --tasks gsm8k --batch_size 8
See evals/README.md for the gsm8k recipes (one GPU, torchrun with expert parallelism, offline data).
"""

import dsr1.eval  # noqa: F401  registers the dsr1 model (and keeps lm-eval's built-in models resolvable)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
