"""Layer 5: spectra of trained networks and of posterior draws, as xarray / ArviZ objects.

``analyze`` (per-layer WeightWatcher-style table), ``posterior`` (draws, InferenceData,
baselines, importance-weighted ELPD, netCDF), ``plots``.
"""
