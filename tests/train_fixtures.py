"""Shared set-up of the trainer tests (imported as `tests.train_fixtures`)."""


def tiny_training_cache(root, n: int):
    """n synthetic 64 px records (all in train) cached with the tiny model (fp32, CPU); returns the cache folder."""
    from editkit.data.synth import synthesize
    from editkit.train.cache import build_cache

    synth = synthesize(root / "data", n=n, size=64, seed=0, val_fraction=0.0, test_fraction=0.0, progress=False)
    build_cache("tiny", synth["train"], root / "cache", area=64 * 64, multiple=16, dtype="fp32", device="cpu",
                progress=False)
    return root / "cache"
