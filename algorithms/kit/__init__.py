"""What methods share: models, local training, functional and vectorized steps, hypernetworks,
the least-squares pieces of the analytic methods and the FedAvg-style server step.

A method module imports the kit and the protocol (simfed.algorithms.base), never another method.
"""
