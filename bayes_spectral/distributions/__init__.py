"""Layer 2: spectral priors as Pyro distributions (one law per file)."""

__all__: list[str] = []
