"""Layer 1: pure torch maths on one weight matrix or a batch of them.

``spectrum`` (ESD, singular values, norms, power iteration), ``powerlaw`` (tail fits),
``laws`` (per-eigenvalue log-density formulas shared by distributions and penalties),
``metrics`` (WeightWatcher-style per-layer metrics), ``tracking`` (top eigenpairs tracked
across training steps). Imports only torch and :mod:`bayes_spectral._checks`.
"""
