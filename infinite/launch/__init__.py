"""Entry points for torchrun (one process per GPU or CPU rank)."""
