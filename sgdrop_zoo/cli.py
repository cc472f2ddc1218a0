"""The ``sgdrop-zoo`` command line.

    sgdrop-zoo models                                   # the registered SGDrop models
    sgdrop-zoo info sgdrop_vgg16 --image-size 224       # latent map and features dropped per sample
"""
import argparse
import sys
from typing import List, Optional

import timm
import torch

from .sgdrop import DEFAULT_RHO, num_dropped_features


def list_models_command(args: argparse.Namespace) -> int:
    for name in timm.list_models(args.filter):
        tags = [tag for tag in timm.list_pretrained(name) if '.' in tag]
        print(name + (f'  (pretrained: {", ".join(tags)})' if tags else ''))
    return 0


def info_command(args: argparse.Namespace) -> int:
    if args.model not in timm.list_models('sgdrop_*'):
        print(f'error: unknown model {args.model!r}; `sgdrop-zoo models` lists them.', file=sys.stderr)
        return 2
    model = timm.create_model(args.model, num_classes=args.num_classes, sgdrop_rho=args.rho).eval()
    size = args.image_size or model.pretrained_cfg['input_size'][-1]
    with torch.no_grad():
        features = model.forward_features(torch.zeros(1, 3, size, size))
    num_features = features[0].numel()
    print(f'model:            {args.model} ({type(model).__name__})')
    print(f'input:            3x{size}x{size}')
    print(f'latent map:       {"x".join(map(str, features.shape[1:]))} = {num_features} features')
    print(f'dropped / sample: {num_dropped_features(args.rho, num_features)} at rho={args.rho}')
    print(f'parameters:       {sum(p.numel() for p in model.parameters()):,}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='sgdrop-zoo', description='Saliency-Guided Dropout models for timm.')
    commands = parser.add_subparsers(dest='command', required=True)
    models = commands.add_parser('models', help='list the registered SGDrop models')
    models.add_argument('filter', nargs='?', default='sgdrop_*', help='wildcard filter (default: sgdrop_*)')
    models.set_defaults(func=list_models_command)
    info = commands.add_parser('info', help='latent feature map and SGDrop mask size of a model')
    info.add_argument('model', help='registered model name, e.g. sgdrop_resnet50')
    info.add_argument('--image-size', type=int, default=None, help="input side (default: the model's)")
    info.add_argument('--rho', type=float, default=DEFAULT_RHO, help=f'share of features dropped ({DEFAULT_RHO})')
    info.add_argument('--num-classes', type=int, default=10)
    info.set_defaults(func=info_command)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import sgdrop_zoo  # noqa: F401  (registers the models with timm)

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
