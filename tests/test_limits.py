"""dit_attn.limits: one set of checks for the API, the CLI and the app."""
import math

import pytest

from dit_attn import limits
from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline


@pytest.mark.parametrize("value", [True, 1.5, math.nan, math.inf, "3", None])
def test_whole_number_refuses_what_is_not_one(value):
    with pytest.raises(ValueError, match="steps must be a whole number"):
        limits.whole_number("steps", value, 1, 10)


def test_bounds_are_named():
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\], got 0"):
        limits.check_steps(0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 9223372036854775807\], got -1"):
        limits.check_seed(-1)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        limits.number("scale", math.nan, 0)
    assert limits.number("scale", 2, 0) == 2.0 and limits.check_steps(7.0) == 7


def test_image_size_limits_come_from_the_model_and_the_machine(monkeypatch):
    sd3 = build_sd3_pipeline(num_layers=1, num_heads=2, head_dim=8)
    multiple = sd3.vae_scale_factor * sd3.transformer.config.patch_size
    largest = sd3.transformer.config.pos_embed_max_size * multiple
    assert limits.size_multiple(sd3) == multiple and limits.max_side(sd3) == largest
    limits.check_image_size(sd3, largest, multiple)
    limits.check_image_size(sd3, None, None)
    with pytest.raises(ValueError, match=f"multiple of {multiple} px"):
        limits.check_image_size(sd3, multiple + 1, multiple)
    with pytest.raises(ValueError, match=f"largest side, {largest} px"):
        limits.check_image_size(sd3, largest + multiple, multiple)
    flux = build_flux_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8)
    assert limits.max_side(flux) is None and limits.size_multiple(flux) == flux.vae_scale_factor * 2
    with pytest.raises(ValueError, match="more than this machine's budget of 16,777,216"):
        limits.check_image_size(flux, 8192, 8192)
    monkeypatch.setenv("DIT_ATTN_MAX_PIXELS", "1024")
    with pytest.raises(ValueError, match="budget of 1,024"):
        limits.check_pixels(64, 32)
    monkeypatch.setenv("DIT_ATTN_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="DIT_ATTN_MAX_PIXELS must be a whole number"):
        limits.max_pixels()


def test_one_radius_bound_for_the_api_and_the_cli(capsys):
    import dit_attn as da
    from dit_attn.cli import main

    with pytest.raises(ValueError, match="radius must be at most 4096 tokens"):
        da.LocalAttention(radius=1e308)
    assert main(["generate", "x", "--local-radius", "1e200", "--out", "/tmp/dit-attn-never-written"]) == 2
    assert "radius must be at most 4096 tokens" in capsys.readouterr().err
