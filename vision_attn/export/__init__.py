"""Take trained models elsewhere: a timm / Hugging Face Hub folder, ONNX, TorchScript and ``torch.export``
programs (``vision-attn export`` on the command line)."""

from vision_attn.export.api import FORMATS, ExportResult, check_out_folder, export_trained, write_export

__all__ = ["FORMATS", "ExportResult", "check_out_folder", "export_trained", "write_export"]
