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


EXPORTED = {  # what export-voc / export-coco print, from export_scenes' report
    "voc": "wrote {images} images and {objects} objects in Pascal VOC layout under {out_dir} "
           "(ImageSets/Main/{split}.txt, items from {source})",
    "coco": "wrote {images} images to {out_dir}/images/{split} and {objects} annotations to {annotations} "
            "(items from {source})",
}


def _run_export(args) -> int:
    from densessl.data.export import export_scenes

    ds = _scenes(args)
    info = export_scenes(ds, args.out_dir, split_name=args.split, image_ext=args.image_ext, layout=args.layout)
    print(EXPORTED[args.layout].format(**info, split=args.split, source=ds.source))
    return 0


def _run_shard(args) -> int:
    from densessl.data.shards import write_shards

    info = write_shards(args.src, args.out, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                        kind=args.kind, split=args.split, order=args.order, seed=args.seed,
                        on_error=args.on_error, log=print)
    split = f", split {info['split']}" if info["split"] else ""
    classes = f", {info['classes']} classes" if info["classes"] else ""
    print(f"wrote {info['count']} samples ({info['kind']}{split}{classes}) in {info['shards']} shards of "
          f"{info['min_shard']}-{info['max_shard']} samples, {info['bytes'] / 2**20:.1f} MiB, to {info['out']} "
          f"(order: {args.order}); train on it with data.dataset=shards data.root={info['out']}")
    return 0


def add_data_commands(subparsers) -> None:
    """Add ``preview``, ``export-voc``, ``export-coco``, ``shard`` and ``flows`` to an argparse subparsers object."""
    from densessl.data.precompute_flows import add_flows_command

    add_flows_command(subparsers)
    p = subparsers.add_parser("preview", help="draw a PNG grid of Fashion-Scenes with boxes and masks",
                              description="Draw Fashion-Scenes with their boxes, class names and "
                                          "instance masks into one PNG.")
    _common(p, 16)
    p.add_argument("--cols", type=_positive_int, default=4, help="scenes per row (default: 4)")
    p.add_argument("--out", default="fashion_scenes_preview.png",
                   help="PNG to write (default: fashion_scenes_preview.png)")
    p.set_defaults(func=_run_preview)

    for layout, fmt in (("voc", "Pascal VOC"), ("coco", "COCO")):
        name = f"export-{layout}"
        p = subparsers.add_parser(name, help=f"write Fashion-Scenes in the {fmt} format",
                                  description=f"Write Fashion-Scenes (images, boxes, masks) in the "
                                              f"{fmt} format.")
        p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into")
        _common(p, 500)
        p.add_argument("--image-ext", choices=("jpg", "png"), default="jpg",
                       help="image format: jpg (quality 95) or lossless png (default: jpg)")
        p.set_defaults(func=_run_export, layout=layout)

    p = subparsers.add_parser("shard", help="write an image folder, VOC, COCO or video frames into shards",
                              description="Copy the images of SRC (unchanged bytes) and their labels into litdata "
                                          "shards under OUT, for data.dataset=shards data.root=OUT "
                                          "(needs densessl[shards]).")
    p.add_argument("src", metavar="SRC", help="an ImageFolder (class sub-folders), a Pascal VOC folder, a COCO "
                                              "folder, or a folder of video frames (--kind video_frames)")
    p.add_argument("out", metavar="OUT", help="new folder for the shards")
    p.add_argument("--kind", choices=("auto", "imagefolder", "voc", "coco", "video_frames"), default="auto",
                   help="source layout (default: auto: voc, coco, else imagefolder)")
    p.add_argument("--split", default=None, help="VOC (default trainval) or COCO (default: the only one) split")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=_positive_int, default=1000,
                      help="samples per shard (default: 1000); the sampler holds one shard's order in memory")
    size.add_argument("--shard-bytes", default=None, help="bytes per shard instead, e.g. 64MB")
    p.add_argument("--order", choices=("shuffled", "source"), default="shuffled",
                   help="shuffled (default: every shard a sample of every class) or the source reader's order")
    p.add_argument("--seed", type=int, default=0, help="seed of --order shuffled (default: 0)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="imagefolder: an unreadable image is an error (default) or skipped and counted")
    p.set_defaults(func=_run_shard)
