"""dit-attn's processors reproduce stock in bfloat16 on every image family (max |Δ| = 0.0): a recorded
transformer call of each family's own pipeline, replayed in bf16 with the stock processors and with
dit-attn's installed (nothing to edit: their own projection, norm and rotary math up to the attention call)."""
import inspect

import pytest
import torch

from dit_attn import processors
from dit_attn.processors.state import EditState

from .conftest import CallRecorder


def _build(family: str):
    if family == "chroma":
        from dit_attn.toy.chroma import build_chroma_pipeline
        return build_chroma_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=16)
    if family == "flux2_klein":
        from dit_attn.toy.flux2 import build_flux2_klein_pipeline
        return build_flux2_klein_pipeline(num_layers=1, num_single_layers=1, num_heads=2)
    if family == "qwen_image":
        from dit_attn.toy.qwen_image import build_qwen_image_pipeline
        return build_qwen_image_pipeline(num_layers=2)
    if family == "z_image":
        from dit_attn.toy.z_image import build_z_image_pipeline
        return build_z_image_pipeline(num_layers=2)
    if family == "hunyuan_image":
        from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline
        return build_hunyuan_image_pipeline(num_layers=1, num_single_layers=1)
    if family == "longcat_image":
        from dit_attn.toy.longcat_image import build_longcat_image_pipeline
        return build_longcat_image_pipeline(num_layers=1, num_single_layers=1, text_encoder=True)
    if family == "ovis_image":
        from dit_attn.toy.ovis_image import build_ovis_image_pipeline
        return build_ovis_image_pipeline(num_layers=1, num_single_layers=1, text_encoder=True)
    from dit_attn.toy.bria import build_bria_pipeline
    return build_bria_pipeline(num_layers=1, num_single_layers=1, text_encoder=True)


FAMILIES = ["chroma", "flux2_klein", "qwen_image", "z_image", "hunyuan_image", "longcat_image", "ovis_image", "bria"]


def _bf16(value):
    if isinstance(value, torch.Tensor):
        return value.to(torch.bfloat16) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_bf16(v) for v in value)
    return value


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in _tensors(item)]


def _first_call(pipe) -> dict:
    options = {"enable_prompt_rewrite": False} if type(pipe).__name__ == "LongCatImagePipeline" else {}
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        options["max_sequence_length"] = 8
    with CallRecorder(pipe) as rec, torch.no_grad():
        pipe(prompt="a red circle", num_inference_steps=1, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0), **options)
    return {**rec.calls[0], "return_dict": False}


@pytest.mark.parametrize("family", FAMILIES)
def test_processors_bit_exact_in_bfloat16(family):
    pipe = _build(family)
    pipe.set_progress_bar_config(disable=True)
    call = {name: _bf16(value) for name, value in _first_call(pipe).items()}
    transformer = pipe.transformer.to(torch.bfloat16)
    with torch.no_grad():
        stock = _tensors(transformer(**call)[0])
        originals = processors.install(transformer, EditState())
        try:
            assert originals, f"{family}: no processor installed"
            mine = _tensors(transformer(**call)[0])
        finally:
            processors.restore(transformer, originals)
    assert stock and all(s.dtype == torch.bfloat16 for s in stock)
    assert all(torch.equal(a, b) for a, b in zip(stock, mine, strict=True))
