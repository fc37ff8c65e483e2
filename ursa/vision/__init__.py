"""Images, datasets, transforms, loaders and the backbone registry."""

# The registry's default backbone; here (not in models.py) so the CLI can show it without importing torch.
DEFAULT_ARCH = "efficientnet_lite0"
