"""The throughput benchmark of the real trainer: `python -m sft.bench --shape NAME [key=value ...]`.

It writes a random-weight model of a named shape and synthetic chat data, runs the user's unchanged
command line with a step callback that records per-step metrics, profiles steps, and compares against
baselines (verl, TRL) run on the same machine. It uses the trainer; nothing outside this package imports it.
"""
