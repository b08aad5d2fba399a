"""Layer 4: any ``nn.Module`` -> a Pyro model with priors on its weights, and its inference.

``network`` (``bayesian``, ``BayesianNetwork``), ``guides``, ``fit`` (MAP, SVI, NUTS with
atomic checkpoints), ``predict`` (predictive metrics), ``distributed`` (data-parallel pieces).
"""
