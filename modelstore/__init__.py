"""The reference models the tiers share: model files and their manifest, the input convention, held-out evaluation.

This layer sits between the device protocol (`publishers`) and the tiers (`edge_workers`, `cloud_workers`):
both tiers load, describe and evaluate the same models, so that code lives here, once.
"""
