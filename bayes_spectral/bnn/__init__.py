"""Layer 4: any ``nn.Module`` -> a Pyro model with priors on its weights, and its inference.

``build`` (``bayesian``), ``network`` (``BayesianNetwork``), ``site_priors``, ``likelihoods``
and ``guides`` (with their registries), ``fit`` (MAP, SVI, NUTS) with ``training`` (the
MAP/SVI loop), ``checkpoint`` (atomic save, resume) and ``guard`` (NaN/Inf stop), ``predict``
(predictive metrics), ``distributed`` (data-parallel pieces).
"""
