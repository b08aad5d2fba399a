"""Layer 5: spectra of trained networks and of posterior draws, as xarray / ArviZ objects.

``analyze`` (per-layer WeightWatcher-style table), ``draws`` (weight and spectral draws of a
fit), ``inference_data`` (``to_inference_data``), ``baselines`` (deterministic networks on a
``method`` dim), ``loo`` (importance-weighted ELPD), ``netcdf``, ``arviz_adapter`` (the one
place that builds and reads ArviZ containers), ``plots``.
"""
