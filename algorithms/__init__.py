"""Federated methods: the algorithm protocol, the registry, shared models and one module per method."""
