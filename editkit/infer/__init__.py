"""Sampling (flow-match Euler, true CFG, bridge), the batched engine, mask fusion, dataset runs."""
