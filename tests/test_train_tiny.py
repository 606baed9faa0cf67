"""The tiny-model trainer runs end to end, resumes after a crash to the same weights, and
its zero-token attention bias equals the stock pipeline's padding."""
import pytest
import torch

from dit_attn.train import tiny as train_tiny
from dit_attn.toy.tiny import CLIP_LENGTH, ZeroTokenBias, make_tokenizer, clip_words, make_transformer

SMALL = dict(images=12, vae_steps=2, vae_batch=2, steps=4, batch=2, checkpoint_every=2, threads=1, compile=False)


def test_every_caption_word_is_one_token():
    tokenizer = make_tokenizer()
    assert all(len(tokenizer.tokenize(word)) == 1 for word in clip_words())


def test_zero_token_bias_equals_stock_padding():
    transformer = make_transformer(0).eval()
    x, clip = torch.randn(2, 8, 16, 16), torch.randn(2, CLIP_LENGTH, 128)
    pooled, t = torch.randn(2, 128), torch.tensor([500.0, 200.0])
    with torch.no_grad():
        stock = transformer(x, torch.cat([clip, torch.zeros(2, 256, 128)], 1), pooled, t).sample
        transformer.set_attn_processor(ZeroTokenBias(256))
        biased = transformer(x, torch.cat([clip, torch.zeros(2, 1, 128)], 1), pooled, t).sample
    assert (stock - biased).abs().max() < 1e-5


@pytest.mark.parametrize("options", [{"bf16": False, "fixed_geometry": False}, {"bf16": True, "layers": 7}],
                         ids=["float32-jittered", "bf16-7-layers"])
def test_train_resume_after_crash_gives_same_weights(tmp_path, monkeypatch, options):
    cfg = train_tiny.TrainConfig(**SMALL, **options)
    reference = train_tiny.train_tiny(cfg, str(tmp_path / "a"), str(tmp_path / "a_out"))

    saves = {"n": 0}
    real_save = train_tiny.save_atomic

    def crash_after_third_save(obj, path):
        real_save(obj, path)
        saves["n"] += 1
        if "transformer" in path:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train_tiny, "save_atomic", crash_after_third_save)
    with pytest.raises(KeyboardInterrupt):
        train_tiny.train_tiny(cfg, str(tmp_path / "b"), str(tmp_path / "b_out"))
    monkeypatch.setattr(train_tiny, "save_atomic", real_save)
    resumed = train_tiny.train_tiny(cfg, str(tmp_path / "b"), str(tmp_path / "b_out"))

    from safetensors.torch import load_file

    a = load_file(f"{reference}/transformer/diffusion_pytorch_model.safetensors")
    b = load_file(f"{resumed}/transformer/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    import dit_attn as da

    pipe = da.load_pipeline(resumed)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_layers == cfg.layers
    image = pipe("a red circle on a white background", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_compiled_training_step_matches_eager(tmp_path):
    """torch.compile (the shipped recipe's default) changes speed, not the training: after the same
    steps from the same seed, the raw weights' updates agree with an eager run's."""
    trained = {}
    for compile_step in (False, True):
        cfg = train_tiny.TrainConfig(**{**SMALL, "compile": compile_step, "bf16": False, "layers": 2, "warmup": 1})
        train_tiny.train_tiny(cfg, str(tmp_path / str(compile_step)), str(tmp_path / f"{compile_step}_out"))
        trained[compile_step] = torch.load(tmp_path / str(compile_step) / "transformer_ckpt.pt")["model"]
    initial = make_transformer(0, 2).state_dict()
    eager, compiled = trained[False], trained[True]
    update = sum(float((eager[k] - initial[k]).norm() ** 2) for k in eager) ** 0.5
    gap = sum(float((compiled[k] - eager[k]).norm() ** 2) for k in eager) ** 0.5
    assert update > 0 and gap < 1e-3 * update


def test_bf16_autocast_keeps_attention_in_float32(monkeypatch):
    """Under bfloat16 autocast the projections are bfloat16 but the attention itself runs in
    float32 (the CPU's bfloat16 attention backward is slow); the output stays close to float32's."""
    from dit_attn import kernels

    transformer = make_transformer(0).eval()
    transformer.set_attn_processor(ZeroTokenBias(256))
    x, text = torch.randn(2, 8, 16, 16), torch.randn(2, CLIP_LENGTH + 1, 128)
    pooled, t = torch.randn(2, 128), torch.tensor([500.0, 200.0])
    seen = []
    real_attention = kernels.attention

    def spy(query, key, value, **kwargs):
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return real_attention(query, key, value, **kwargs)

    with torch.no_grad():
        full = transformer(x, text, pooled, t).sample
        monkeypatch.setattr(kernels, "attention", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = transformer(x, text, pooled, t).sample.float()
    assert len(seen) == 6 and all(dtype == torch.float32 and not autocast for dtype, autocast in seen)
    assert (mixed - full).norm() / full.norm() < 0.05


def test_cli_flags_for_bool_fields(tmp_path, monkeypatch):
    from dit_attn.cli import main

    got = {}
    monkeypatch.setattr(train_tiny, "train_tiny", lambda cfg, work, out, restart=False: got.setdefault("cfg", cfg))
    main(["train-tiny", "--work", str(tmp_path), "--out", str(tmp_path / "o"), "--bf16", "--layers", "8",
          "--sign-fraction", "0.25"])
    assert got["cfg"].bf16 is True and got["cfg"].layers == 8 and got["cfg"].sign_fraction == 0.25
    got.clear()
    main(["train-tiny", "--work", str(tmp_path), "--out", str(tmp_path / "o"), "--no-bf16", "--no-fixed-geometry",
          "--no-compile"])
    assert got["cfg"].bf16 is False and got["cfg"].fixed_geometry is False and got["cfg"].compile is False
    got.clear()
    main(["train-tiny", "--work", str(tmp_path), "--out", str(tmp_path / "o")])
    assert got["cfg"] == train_tiny.TrainConfig()
