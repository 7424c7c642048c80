"""Federated datasets: the Arrow partition store, importers (LEAF, IDX, synthetic) and split schemes."""
