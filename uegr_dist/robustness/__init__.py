"""Robustness evaluation: offline adversarial attacks on a saved classifier and a robustness report (`uegr-eval`)."""

from uegr_dist.robustness.config import ATTACKS, EvalConfig, load_eval_config
from uegr_dist.robustness.examples import Example, load_examples
from uegr_dist.robustness.runner import evaluate_robustness

__all__ = ["ATTACKS", "EvalConfig", "Example", "evaluate_robustness", "load_eval_config", "load_examples"]
