"""Transitional alias: environments installed before the repair moved to the
top-level ``torchvision_repair`` still import this module from their startup
hook. Delete it once every environment is reinstalled (``make setup``)."""

from torchvision_repair import install  # noqa: F401
