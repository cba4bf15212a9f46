"""Interop: backbone exports (exports.py); official checkpoints in (official.py). Backbone files
are read by densessl.eval.backbone (every eval protocol's loader).

The names below are the public interface (`densessl.interop.export_backbone`, ...)."""
from densessl.common.errors import InteropError
from densessl.interop.exports import (DETECTRON2_CONFIG, EXPORT_FORMATS, SAFETENSORS_FORMAT, TORCHVISION_ARCHS,
                                      detectron2_key, export_backbone, portable_pickle, to_detectron2,
                                      torchvision_key_from_detectron2)
from densessl.interop.official import (LAYOUTS, ImportReport, Layout, extract_backbone_state, import_official,
                                       read_file, save_imported)

__all__ = ["DETECTRON2_CONFIG", "EXPORT_FORMATS", "SAFETENSORS_FORMAT", "TORCHVISION_ARCHS", "InteropError",
           "detectron2_key", "export_backbone", "portable_pickle", "to_detectron2", "torchvision_key_from_detectron2",
           "LAYOUTS", "ImportReport", "Layout", "extract_backbone_state", "import_official", "read_file",
           "save_imported"]
