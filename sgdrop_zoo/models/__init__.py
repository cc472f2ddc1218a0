"""timm-registered SGDrop model families (importing this module registers them)."""
from .cifar_cnn import *
from .convnext import *
from .resnet import *
from .vgg import *
