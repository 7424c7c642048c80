"""The bottom layer: errors, validation primitives, safe file I/O, seed derivation, typed configs.

Imports nothing of simfed's other layers; every other layer may import it.
"""
