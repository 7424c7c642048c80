"""simfed engine: Ray worker pool, server actor, round loop, metrics and checkpoints.

Importing this package is cheap (no Ray, no torch); submodules pull what they need.
"""
