"""``data.decode_on=device``: the loader workers read each image's encoded bytes and draw its
crops; the training process decodes the batch on train.device and cuts the views there.

On a GPU this moves JPEG decoding off the CPU cores (nvJPEG through torchvision.io.decode_jpeg,
one batched call), which is what starves a GPU fed from a folder of JPEGs on a machine with few
cores. On the CPU the same path decodes with densessl's one decoder (image_io.decode_rgb), so a
run gives the losses of ``data.decode_on=workers`` bit for bit (tests/data/test_device_decode.py);
that is how the path is tested on machines without a GPU.

The crops are drawn by the ViewSampler's own rule from the image size in the file's header, with
the same random stream as the workers' path, and cut by the same `crop_view`. Only crop view
groups are supported (the pyramid grids of SS-PRL / GAELLE cut patches from a region crop: they
stay on the workers), and only image sources with encoded bytes (imagefolder, shards).
"""
from __future__ import annotations

import numpy as np
import torch

from densessl.data.image_io import DecodeError, decode_rgb, fit_square
from densessl.data.views import ViewDataset, collate_views, crop_view

DECODE_ON = ("workers", "device")


class EncodedViews(ViewDataset):
    """(epoch, index) -> an image's encoded bytes and the crops its views take, drawn exactly as
    ViewDataset draws them. `base.encoded(i)` gives {"data": bytes, "hw": (H, W) of the image the
    views are cut from, "where": a name for errors, "fit": square side or None, labels ...}."""

    def __getitem__(self, key):
        epoch, index = key
        item = self.base.encoded(index)
        H, W = item["hw"]
        rng = np.random.default_rng([self.seed, epoch, index])
        crops = self.sampler.draw(H, W, rng)
        out = {"encoded": torch.frombuffer(bytearray(item["data"]), dtype=torch.uint8), "crops": crops,
               "geometry": [c.geometry(H, W) for c in crops], "index": index, "source_size": (W, H),
               "where": item["where"], "fit": item["fit"]}
        for k in ("labels", "label"):  # targets for the online probe, as ViewDataset passes them
            if k in item:
                out[k] = item[k]
        return out


def collate_encoded(samples: list[dict]) -> dict:
    """collate_views' geometry and targets; the encoded images and their crops as lists."""
    batch = collate_views(samples)
    batch.update(encoded=[s["encoded"] for s in samples], where=[s["where"] for s in samples],
                 fit=samples[0]["fit"], crops=[[s["crops"][v] for s in samples] for v in range(len(samples[0]["crops"]))])
    return batch


def decode_batch(encoded: list[torch.Tensor], where: list[str], device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB (3, H, W) images on `device`. CUDA: one batched nvJPEG call, a file it refuses
    (not a JPEG, CMYK, ...) decoded on the CPU by decode_rgb; CPU: decode_rgb, the workers' decoder."""
    from densessl.common.errors import ImageReadError

    images: list[torch.Tensor | None] = [None] * len(encoded)
    if device.type == "cuda":
        import torchvision.io as tio

        try:
            decoded = tio.decode_jpeg(encoded, mode=tio.ImageReadMode.RGB, device=device)
            images = [im.contiguous() for im in decoded]
        except RuntimeError:  # one file nvJPEG refuses fails the batched call: each on its own then
            for i, data in enumerate(encoded):
                try:
                    images[i] = tio.decode_jpeg(data, mode=tio.ImageReadMode.RGB, device=device).contiguous()
                except RuntimeError:
                    pass
    for i, image in enumerate(images):
        if image is None:
            try:
                images[i] = decode_rgb(encoded[i].numpy().tobytes()).to(device, non_blocking=True)
            except DecodeError as e:
                raise ImageReadError(f"could not decode {where[i]} ({e}); an imagefolder's data.on_error=skip "
                                     f"drops undecodable files before training") from e
    return images


def decode_views(batch: dict, device: torch.device) -> list[torch.Tensor]:
    """The batch's uint8 views per slot (B, 3, S, S) on `device`, cut as the workers cut them."""
    images = decode_batch(batch["encoded"], batch["where"], device)
    if batch["fit"] is not None:
        images = [fit_square(im, batch["fit"]) for im in images]
    return [torch.stack([crop_view(im, c.top, c.left, c.h, c.w, c.flip, c.size)[0] for im, c in zip(images, slot)])
            for slot in batch["crops"]]
