"""The training engine: run set-up, the loop and its step, evaluation, checkpoints, logging, the backend."""
