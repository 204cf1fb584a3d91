"""Benchmarks (not tests): each script prints ratios measured side by side in one process."""
