"""``densessl data ...`` subcommands: preview, export-voc, export-coco (Fashion-Scenes).

The main CLI calls ``add_data_commands(data_parser.add_subparsers(...))``; every subcommand
sets ``func``, a callable ``(args) -> int`` exit status.
"""
from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"expected a canvas size of at least 8 pixels, got {value}")
    return value


def _common(p: argparse.ArgumentParser, num_default: int) -> None:
    p.add_argument("--split", choices=("train", "val"), default="train",
                   help="which item pool the scenes draw from (default: train)")
    p.add_argument("--num", type=_positive_int, default=num_default,
                   help=f"number of scenes (default: {num_default})")
    p.add_argument("--size", type=_size, default=64, help="canvas side in pixels (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default: 0)")
    p.add_argument("--root", default=None,
                   help="folder with the four Fashion-MNIST .gz files (default: search; see docs)")


def _scenes(args):
    from densessl.data.scenes import FashionScenes

    return FashionScenes(split=args.split, num_scenes=args.num, size=args.size, seed=args.seed,
                         root=args.root, with_masks=True)


def _run_preview(args) -> int:
    from densessl.data.export import preview

    ds = _scenes(args)
    w, h = preview(ds, args.out, n=args.num, cols=args.cols)
    print(f"wrote {args.out} ({w}x{h} px, {args.num} {args.split} scenes of {args.size} px, "
          f"seed {args.seed}, items from {ds.source})")
    return 0


def _run_export_voc(args) -> int:
    from densessl.data.export import export_voc

    ds = _scenes(args)
    info = export_voc(ds, args.out_dir, split_name=args.split, image_ext=args.image_ext)
    print(f"wrote {info['images']} images and {info['objects']} objects in Pascal VOC layout "
          f"under {info['out_dir']} (ImageSets/Main/{args.split}.txt, items from {ds.source})")
    return 0


def _run_export_coco(args) -> int:
    from densessl.data.export import export_coco

    ds = _scenes(args)
    info = export_coco(ds, args.out_dir, split_name=args.split, image_ext=args.image_ext)
    print(f"wrote {info['images']} images to {info['out_dir']}/images/{args.split} and "
          f"{info['objects']} annotations to {info['annotations']} (items from {ds.source})")
    return 0


def add_data_commands(subparsers) -> None:
    """Add ``preview``, ``export-voc`` and ``export-coco`` to an argparse subparsers object."""
    p = subparsers.add_parser("preview", help="draw a PNG grid of Fashion-Scenes with boxes and masks",
                              description="Draw Fashion-Scenes with their boxes, class names and "
                                          "instance masks into one PNG.")
    _common(p, 16)
    p.add_argument("--cols", type=_positive_int, default=4, help="scenes per row (default: 4)")
    p.add_argument("--out", default="fashion_scenes_preview.png",
                   help="PNG to write (default: fashion_scenes_preview.png)")
    p.set_defaults(func=_run_preview)

    for name, fmt, run in (("export-voc", "Pascal VOC", _run_export_voc),
                           ("export-coco", "COCO", _run_export_coco)):
        p = subparsers.add_parser(name, help=f"write Fashion-Scenes in the {fmt} format",
                                  description=f"Write Fashion-Scenes (images, boxes, masks) in the "
                                              f"{fmt} format.")
        p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into")
        _common(p, 500)
        p.add_argument("--image-ext", choices=("jpg", "png"), default="jpg",
                       help="image format: jpg (quality 95) or lossless png (default: jpg)")
        p.set_defaults(func=run)
