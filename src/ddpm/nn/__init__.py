"""Networks: the U-Net and its layers."""
from .unet import UNet, check_image_size, count_parameters, resolved_out_channels

__all__ = ["UNet", "check_image_size", "count_parameters", "resolved_out_channels"]
