"""Command-line tools that make or convert data (synthetic BOP set, BOP -> TFDS, ImageNet weights)."""
