"""Interop: backbone exports and loading (exports.py); official checkpoints in (official.py).

The names below are the public interface (`densessl.interop.export_backbone`, ...)."""
from densessl.interop.exports import (DETECTRON2_CONFIG, EXPORT_FORMATS, SAFETENSORS_FORMAT, TORCHVISION_ARCHS,
                                      InteropError, backbone_arch, build_strict, detectron2_key, export_backbone,
                                      infer_arch, load_any_backbone, load_safetensors_backbone, portable_pickle,
                                      to_detectron2, torchvision_key_from_detectron2)
from densessl.interop.official import (LAYOUTS, ImportReport, Layout, extract_backbone_state, import_official,
                                       read_file, save_imported)

__all__ = ["DETECTRON2_CONFIG", "EXPORT_FORMATS", "SAFETENSORS_FORMAT", "TORCHVISION_ARCHS", "InteropError",
           "backbone_arch", "build_strict", "detectron2_key", "export_backbone", "infer_arch", "load_any_backbone",
           "load_safetensors_backbone", "portable_pickle", "to_detectron2", "torchvision_key_from_detectron2",
           "LAYOUTS", "ImportReport", "Layout", "extract_backbone_state", "import_official", "read_file",
           "save_imported"]
