"""Adapter kinds, one module each (LoRA family, orthogonal, IP-Adapter, control, style, erasing)."""
