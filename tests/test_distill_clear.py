"""distill-clear: the student moves toward the full-attention teacher, resumes exactly,
and its weights file loads (full and LoRA) through LocalAttention(weights=...)."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dit_attn as da
from dit_attn.toy.configs import build_sd3_pipeline
from dit_attn.train import distill_clear
from dit_attn.train.distill_clear import DistillConfig, distill

SMALL = dict(radius=1.5, samples=4, sample_steps=2, size=32, steps=8, batch=2, lr=3e-3, warmup=1, checkpoint_every=3,
             max_sequence_length=2)
PROMPTS = ["a red circle", "a blue square", "a green cross", "a white diamond"]


@pytest.fixture()
def pipe():
    pipe = build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8, seed=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_gap(pipe, *edits) -> float:
    """MSE between the full-attention model and the edited one on fixed noisy latents."""
    g = torch.Generator().manual_seed(99)
    transformer = pipe.transformer
    x = torch.randn(2, transformer.config.in_channels, 8, 8, generator=g)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], PROMPTS[:2], PROMPTS[:2], do_classifier_free_guidance=False,
                                              max_sequence_length=2)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        full = transformer(x, embeds, pooled, t).sample
        with da.apply(pipe, *edits):
            local = transformer(x, embeds, pooled, t).sample
    return float(((local - full) ** 2).mean())


def test_distillation_closes_the_gap_and_the_file_loads_bit_exactly(pipe, tmp_path):
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    out = str(tmp_path / "clear.safetensors")
    # flow matching off: with random weights its target pulls away from the teacher
    summary = distill(pipe, DistillConfig(**{**SMALL, "lr": 1e-3}, downsample=2, flow_weight=0.0), str(tmp_path / "work"), out, PROMPTS)
    assert len(summary["losses"]) == SMALL["steps"]
    # the pipeline keeps its own weights
    assert all(torch.equal(before[n], p) for n, p in pipe.transformer.named_parameters())
    tensors = load_file(out)
    assert any(n.endswith("attn.to_q.weight") for n in tensors) and any(n.endswith("local_pool.spatial_weight") for n in tensors)
    assert not any("norm" in n or "ff." in n for n in tensors)  # only attention projections train
    zero_shot = teacher_gap(pipe, da.LocalAttention(1.5, downsample=2))
    distilled = teacher_gap(pipe, da.LocalAttention(1.5, downsample=2, weights=out))
    assert distilled < zero_shot
    with da.apply(pipe, da.LocalAttention(1.5, downsample=2, weights=out)):
        params = dict(pipe.transformer.named_parameters())
        assert all(torch.equal(params[n], t) for n, t in tensors.items())


def test_resume_after_a_kill_gives_the_same_weights(pipe, tmp_path, monkeypatch):
    cfg = DistillConfig(**SMALL)
    distill(pipe, cfg, str(tmp_path / "a"), str(tmp_path / "a.safetensors"), PROMPTS)

    real_save = distill_clear.save_atomic

    def killed_after_first_checkpoint(obj, path):
        real_save(obj, path)
        if path.endswith("state.pt"):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(distill_clear, "save_atomic", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        distill(pipe, cfg, str(tmp_path / "b"), str(tmp_path / "b.safetensors"), PROMPTS)
    monkeypatch.setattr(distill_clear, "save_atomic", real_save)
    distill(pipe, cfg, str(tmp_path / "b"), str(tmp_path / "b.safetensors"), PROMPTS)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_distillation_saves_adapters_that_merge_on_load(pipe, tmp_path):
    out = str(tmp_path / "lora.safetensors")
    distill(pipe, DistillConfig(**SMALL, lora_rank=2, lora_alpha=4.0), str(tmp_path / "work"), out, PROMPTS)
    assert not pipe.transformer.peft_config if hasattr(pipe.transformer, "peft_config") else True
    tensors = load_file(out)
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["lora_rank"] == "2" and meta["lora_alpha"] == "4.0"
    name = "transformer_blocks.0.attn.to_q"
    down, up = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
    base = pipe.transformer.get_parameter(f"{name}.weight").detach().clone()
    with da.apply(pipe, da.LocalAttention(1.5, weights=out)):
        merged = pipe.transformer.get_parameter(f"{name}.weight")
        assert torch.allclose(merged, base + 2.0 * up @ down, atol=1e-6)
        assert (merged - base).abs().max() > 0
    assert torch.equal(pipe.transformer.get_parameter(f"{name}.weight"), base)


def test_bad_settings():
    with pytest.raises(ValueError, match="radius"):
        DistillConfig(radius=0)
    with pytest.raises(ValueError, match="lora_rank"):
        DistillConfig(radius=2, lora_rank=0)
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(radius=2, steps=0)


def test_cli_distill_clear(tmp_path, capsys):
    from dit_attn.cli import main

    out = tmp_path / "clear.safetensors"
    args = ["distill-clear", "--work", str(tmp_path / "w"), "--out", str(out), "--radius", "2", "--samples", "2",
            "--sample-steps", "1", "--size", "32", "--steps", "2", "--batch", "1"]
    assert main(args) == 0
    assert out.exists() and "2 steps" in capsys.readouterr().out
    assert main(["distill-clear", "--work", str(tmp_path / "w2"), "--out", str(out), "--radius", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "dit-attn distill-clear: error: radius must be a finite number > 0 (in tokens), got -1.0"


def test_flux_distillation_closes_the_gap(tmp_path):
    from dit_attn.toy.configs import build_flux_pipeline

    pipe = build_flux_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    out = str(tmp_path / "flux.safetensors")
    distill(pipe, DistillConfig(**{**SMALL, "lr": 1e-3}, flow_weight=0.0), str(tmp_path / "work"), out, PROMPTS)
    tensors = load_file(out)
    assert "single_transformer_blocks.0.attn.to_q.weight" in tensors and "transformer_blocks.0.attn.to_out.0.weight" in tensors

    def gap(*edits):
        g = torch.Generator().manual_seed(99)
        transformer = pipe.transformer
        x = torch.randn(2, 16, transformer.config.in_channels, generator=g)  # a 4x4 token grid, packed
        ids = pipe._prepare_latent_image_ids(1, 4, 4, x.device, x.dtype)
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS[:2], PROMPTS[:2], max_sequence_length=2)
        args = dict(encoder_hidden_states=embeds, pooled_projections=pooled, timestep=torch.tensor([0.3, 0.7]), img_ids=ids,
                    txt_ids=torch.zeros(2, 3), guidance=torch.full((2,), 3.5) if transformer.config.guidance_embeds else None)
        with torch.no_grad():
            full = transformer(hidden_states=x, **args).sample
            with da.apply(pipe, *edits):
                local = transformer(hidden_states=x, **args).sample
        return float(((local - full) ** 2).mean())

    assert gap(da.LocalAttention(1.5, weights=out)) < gap(da.LocalAttention(1.5))
