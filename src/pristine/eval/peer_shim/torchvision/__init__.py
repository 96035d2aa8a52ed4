"""A stand-in for the parts of torchvision a trainer script's data path uses, for `pristine bench peer`.

PyPI's torchvision builds do not import beside the CPU torch this project pins, and the diffusers
DreamBooth scripts import `torchvision.transforms` only for resizing, cropping and normalising their
instance images. `pristine bench peer` puts this folder on the peer's path only when its Python cannot
import torchvision itself. It is never installed with pristine.
"""

__version__ = "0.0.0+pristine-peer-shim"
