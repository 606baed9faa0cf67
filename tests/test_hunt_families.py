"""Head search on the newer families: the scores of many head sets from one pipeline call equal one guided
pipeline run per candidate (the per-row strengths of a guided call, widened rows, each family's CFG)."""
import importlib

import numpy as np
import pytest
import torch

import dit_attn as da
from dit_attn.guidance.search import SearchSettings, call_kwargs, score_batch

FAMILIES = {  # builder, guidance_scale of the search (None: the pipeline's default)
    "chroma": ("dit_attn.toy.chroma", "build_chroma_pipeline", 3.0),
    "qwen_image": ("dit_attn.toy.qwen_image", "build_qwen_image_pipeline", None),
    "z_image": ("dit_attn.toy.z_image", "build_z_image_pipeline", 3.0),
    "flux2_klein": ("dit_attn.toy.flux2", "build_flux2_klein_pipeline", 3.0),
}
PROMPTS = ["a red circle", "a blue square"]


def objective(images, prompts):
    """Mean brightness: continuous, so every change of an image shows (random-weight models draw no shapes)."""
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_scores_equal_one_pipeline_run_per_candidate(family):
    module, builder, cfg = FAMILIES[family]
    pipe = getattr(importlib.import_module(module), builder)()
    pipe.set_progress_bar_config(disable=True)
    settings = SearchSettings("brightness", tuple(PROMPTS), (0, 1), k=1, rounds=1, u=0.8, scale=4.0, num_inference_steps=2,
                              guidance_scale=cfg, height=32, width=32, candidates=(), target="identity", scope="joint",
                              batch_size=3, max_sequence_length=None)
    selected, batch = [(1, 1)], [(0, 1), (0, 3) if da.layers(pipe)[0].heads > 3 else (0, 0), (1, 0)]
    batched = score_batch(pipe, objective, settings, selected, batch)
    for cand in batch:
        scores = []
        with da.apply(pipe, da.HeadGuidance(heads=[cand] + selected, scale=4.0, u=0.8)):
            for prompt in PROMPTS:
                for seed in (0, 1):
                    image = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed),
                                 **call_kwargs(settings)).images[0]
                    scores += objective([image], [prompt])
        assert abs(batched[f"L{cand[0]}H{cand[1]}"] - sum(scores) / len(scores)) < 2e-3, cand
    plain = [objective([pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **call_kwargs(settings)).images[0]],
                       [prompt])[0] for prompt in PROMPTS for seed in (0, 1)]
    assert max(abs(score - sum(plain) / len(plain)) for score in batched.values()) > 1e-4  # guidance did change images
