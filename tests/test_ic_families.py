"""In-context sets on the families whose latents dit-attn encodes, and a clear refusal elsewhere."""
import numpy as np
import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.ic.latents import decode, encode, image_tensor
from dit_attn.toy.chroma import build_chroma_pipeline
from dit_attn.toy.qwen_image import build_qwen_image_pipeline
from dit_attn.train.flow import latents_of


def test_chroma_set_keeps_its_reference_panel():
    pipe = build_chroma_pipeline()
    pipe.set_progress_bar_config(disable=True)
    reference = Image.new("RGB", (32, 32), (200, 30, 30))
    kwargs = dict(size=(32, 64), num_inference_steps=2, decode="panels", max_sequence_length=8)
    result = da.ic.generate_set(pipe, ["a red circle", "a blue square"], (1, 2), reference={0: reference}, **kwargs)
    again = da.ic.generate_set(pipe, ["a red circle", "a blue square"], (1, 2), reference={0: reference}, **kwargs)
    assert result.canvas.size == (64, 32) and result.canvas.tobytes() == again.canvas.tobytes()
    round_trip = decode(pipe, encode(pipe, image_tensor(reference, 32, 32)))[0]  # what the kept panel must show
    panel = torch.from_numpy(np.asarray(result.panels[0], dtype=np.float32) / 255).permute(2, 0, 1)
    assert (panel - round_trip.cpu().float()).abs().max() < 2 / 255


def test_other_latent_formats_are_refused_before_any_work():
    pipe = build_qwen_image_pipeline()
    with pytest.raises(TypeError, match="qwen_image pipelines use another latent format"):
        da.ic.generate_set(pipe, ["a red circle", "a blue square"], (1, 2), size=(32, 64), num_inference_steps=2)
    with pytest.raises(TypeError, match="qwen_image pipelines use another latent format"):
        latents_of(pipe, torch.zeros(1, 3, 32, 32))
