"""Which case families each profile runs: full (by hand) and ci (tests/test_reliability_ci.py)."""

from bench.reliability import app_clients, corrupt

FULL = {
    "kill": ("build", "cache", "train", "train-val", "train-ddp", "infer", "infer-ddp", "eval", "compare"),
    "corrupt": tuple(corrupt.CASES),
    "enospc": ("build", "cache", "infer", "eval"),
    "flags": ("*",),  # every command the CLI has
    "app": app_clients.KINDS,
}
CI = {
    "kill": ("build",),
    "corrupt": ("manifest-jsonl", "manifest-csv", "image", "mask", "build-fingerprint", "cache-shard", "cache-index"),
    "enospc": ("build-small",),
    "flags": ("version", "data synth", "data validate", "data convert", "data build", "data split", "data select",
              "data mix", "model info"),
    "app": app_clients.KINDS,
}
