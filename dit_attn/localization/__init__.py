"""Text-layer localization: patch the text keys/values of chosen layers (TextPatch), find
the layers that draw text (`localize`), edit text (`edit_text`), train LoRA on those layers
only (`localized_lora_config`), and block words (TextGuard)."""
from .editing import TextEdit, edit_text
from .localize import LayerScore, LocalizationResult, localize, sign_pairs
from .lora import localized_lora_config, localized_lora_modules, save_lora
from .score import OCRScore, TextPair, judge_score, ssim, ssim_score

__all__ = [
    "LayerScore", "LocalizationResult", "OCRScore", "TextEdit", "TextPair", "edit_text", "judge_score", "localize",
    "localized_lora_config", "localized_lora_modules", "save_lora", "sign_pairs", "ssim", "ssim_score",
]
