"""Images, datasets, transforms, loaders and the backbone registry."""

# The registry's default backbone; here (not in models.py) so the CLI can show it without importing torch.
DEFAULT_ARCH = "efficientnet_lite0"

# Which mirror images keep an image's class, as augmentation (and test-time views): "horizontal"
# (photos), "all" (no "up": satellite tiles, microscopy: both mirrors and quarter turns), "none"
# (a mirrored 2 is not a 2: digits, text). Here so torch-free code (config, TTA) can name them.
FLIPS = ("none", "horizontal", "all")
