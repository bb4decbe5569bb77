"""The merge engine: per-module deltas of weight-space adapters, and (issue 5) methods over them."""
