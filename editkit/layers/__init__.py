"""Layered RGBA data (Qwen-Image-Layered): readers for PSD/PSB, Crello-style and split-layer
folders, the synthetic layered-scene generator, `editkit layers prep|validate|synth` and the
component dataloader. See docs/layers.md."""
