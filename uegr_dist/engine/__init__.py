"""The training engine (loop, accelerator set-up)."""
