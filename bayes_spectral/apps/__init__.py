"""Layer 6: applications built on every layer: ``compare`` (the main job), ``report``
(self-contained HTML), ``ddp_demo`` (``python -m bayes_spectral.distributed``)."""
