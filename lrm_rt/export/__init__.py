"""Export of the image-to-triplane network: ONNX graphs, fp16 variants, TensorRT engines, manifest.

``export_model`` writes an export directory; ``read_manifest`` loads and checks one. The runtime
backends that execute it are ``lrm_rt.onnx_backend`` and ``lrm_rt.tensorrt_backend``.
"""
from .manifest import (DECODER_NAME, MANIFEST_NAME, config_from_dict, config_to_dict, is_export_dir,
                       load_decoder, manifest_config, read_manifest)
from .onnx_export import (DEFAULT_OPSET, FP16_TOL, FP32_TOL, ExportError, export_model, require_onnx,
                          sample_inputs)

__all__ = ["DECODER_NAME", "MANIFEST_NAME", "config_from_dict", "config_to_dict", "is_export_dir", "load_decoder",
           "manifest_config", "read_manifest", "DEFAULT_OPSET", "FP16_TOL", "FP32_TOL", "ExportError",
           "export_model", "require_onnx", "sample_inputs"]
