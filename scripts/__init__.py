"""Tools a bundle user runs from the bundle root as ``python -m scripts.NAME``: datalists for the public chest
X-ray sets (docs/data.md), the augmentation check and Model Zoo packaging."""
