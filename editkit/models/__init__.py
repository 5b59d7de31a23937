"""Model families, component loading, tiny presets, the EditModel facade and LoRA."""
