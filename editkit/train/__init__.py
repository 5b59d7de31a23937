"""Objectives (flow matching, LBM), the trainer loop, checkpoints, optimizers, the cache."""
