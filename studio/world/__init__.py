"""The shapes world: renders with exact labels, the evaluator, and the world models' recipes."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "world"  # the shipped world models
