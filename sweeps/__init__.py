"""Many runs: Ray Tune sweeps (grids of methods x hyperparameters x seeds) and the paper table.

Sits above the engine (each trial is one engine run) and below the CLI.
"""
