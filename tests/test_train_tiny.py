"""The tiny-model trainer runs end to end, resumes after a crash to the same weights, and
its zero-token attention bias equals the stock pipeline's padding."""
import pytest
import torch

from dit_attn.models import train_tiny
from dit_attn.models.tiny import CLIP_LENGTH, ZeroTokenBias, make_tokenizer, clip_words, make_transformer

SMALL = dict(images=12, vae_steps=2, vae_batch=2, steps=4, batch=2, checkpoint_every=2, threads=1)


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


def test_train_resume_after_crash_gives_same_weights(tmp_path, monkeypatch):
    cfg = train_tiny.TrainConfig(**SMALL)
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
    image = pipe("a red circle on a white background", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
