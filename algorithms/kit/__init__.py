"""What methods share: models, local training, functional and vectorized steps, the global model
of the FedAvg family (globalmodel), proximal personal models (proximal), hypernetworks
(hypernet), and the least-squares pieces of the analytic methods (analytic, gram, acnnl).

A method module imports the kit and the protocol (simfed.algorithms.base), never another method.
"""
