"""Sampling defaults shared by the engine, the samplers, the CLI, dataset runs and the app.

Kept free of imports so that the CLI can read them without loading torch.
"""

STEPS = 40
"""Flow-matching steps (the Qwen-Image-Edit model cards use 40 to 50; 40 is the 2511 card's)."""
TRUE_CFG_SCALE = 4.0
"""True CFG scale of the pipelines' examples."""
NEGATIVE_PROMPT = " "
"""The pipelines' examples pass a single space: true CFG runs, against an almost empty prompt."""
BRIDGE_NOISE = 0.005
"""LBM bridge noise at inference (the LBM paper's value)."""
