"""Networks: the table of architectures (the U-Net, the DiT), their one constructor, their layers."""
from .dit import DiT
from .networks import NETWORKS, NetworkSpec, build_network, check_image_size, network_spec
from .unet import UNet, count_parameters, resolved_out_channels

__all__ = ["DiT", "NETWORKS", "NetworkSpec", "UNet", "build_network", "check_image_size", "count_parameters",
           "network_spec", "resolved_out_channels"]
