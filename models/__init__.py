"""Reference models of the papers bayes-spectral builds on (installed as bayes_spectral.models)."""
