"""dit-attn beside other mechanisms that wrap a model: accelerate's hooks added after `apply`, and
`copy.deepcopy` (issue 24)."""
import copy

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import ModelHook as AccelerateHook, add_hook_to_module, remove_hook_from_module

import dit_attn as da
from dit_attn.toy.configs import build_sd3_pipeline


def transformer_call(transformer, seed=0):
    config = transformer.config
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, config.in_channels, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([500.0, 300.0]))


@pytest.fixture()
def pipe():
    return build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8)


class Counting(AccelerateHook):
    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_remove_keeps_an_accelerate_hook_added_after_apply(pipe):
    transformer = pipe.transformer
    call = transformer_call(transformer)
    with torch.no_grad():
        stock = transformer(**call).sample
        handle = da.apply(pipe, da.SoftPAG(heads=["L0", "L1H1"], u=0.7))
        edited = transformer(**call).sample
        counter = Counting()
        add_hook_to_module(transformer, counter)
        assert torch.equal(transformer(**call).sample, edited) and counter.calls == 1
        handle.remove()
        assert torch.equal(transformer(**call).sample, stock) and counter.calls == 2  # the hook still runs
        again = da.apply(pipe, da.SoftPAG(heads=["L0", "L1H1"], u=0.7))  # and the edits can come back
        assert torch.equal(transformer(**call).sample, edited) and counter.calls == 3
        again.remove()
        remove_hook_from_module(transformer)
        assert torch.equal(transformer(**call).sample, stock)
    assert not torch.equal(edited, stock)


def test_cpu_offload_inside_and_outside_apply(pipe):
    transformer = pipe.transformer
    call = transformer_call(transformer, seed=1)
    with torch.no_grad():
        stock = transformer(**call).sample
        with da.apply(pipe, da.SoftPAG(heads=["L0H0"], u=0.5)):
            edited = transformer(**call).sample
        cpu_offload(transformer, execution_device="cpu")  # weights leave for a CPU copy, loaded per call
        assert torch.equal(transformer(**call).sample, stock)
        with da.apply(pipe, da.SoftPAG(heads=["L0H0"], u=0.5)):
            assert torch.equal(transformer(**call).sample, edited)
        assert torch.equal(transformer(**call).sample, stock)


def test_deepcopy_of_an_applied_model_is_refused_and_works_after_remove(pipe):
    transformer = pipe.transformer
    call = transformer_call(transformer)
    handle = da.apply(pipe, da.SoftPAG(heads=["L0H1"], u=1.0))
    with pytest.raises(TypeError, match="remove\\(\\) the edits, copy, then apply"):
        copy.deepcopy(transformer)
    handle.remove()
    copied = copy.deepcopy(transformer)
    with torch.no_grad():
        assert torch.equal(copied(**call).sample, transformer(**call).sample)
        copied.proj_out.weight.mul_(2)  # the copy runs its own weights
        assert not torch.allclose(copied(**call).sample, transformer(**call).sample)


@pytest.mark.parametrize("backend", ["_native_math", "flash"])
def test_unedited_layers_run_the_attention_backend_chosen_with_diffusers(flux_pipe, backend):
    """`with attention_backend(...)` reaches every layer dit-attn leaves unedited (SoftPAG at u = 0 included):
    outputs are bit-exact with stock under the same backend, and a backend that cannot run here fails as stock does."""
    from diffusers.models.attention_dispatch import attention_backend

    from .conftest import CallRecorder, flux_call, replay

    with CallRecorder(flux_pipe) as rec:
        flux_call(flux_pipe, steps=1)
    call = rec.calls[0]
    edits = (da.SoftPAG(["L0", "L1", "L2", "L3"], u=0.0),)
    if backend == "flash":
        with pytest.raises(RuntimeError, match="not usable"), attention_backend(backend):
            replay(flux_pipe.transformer, call)
        with da.apply(flux_pipe.transformer, *edits), pytest.raises(RuntimeError, match="not usable"), attention_backend(backend):
            replay(flux_pipe.transformer, call)
        return
    with attention_backend(backend):
        stock = replay(flux_pipe.transformer, call)
        with da.apply(flux_pipe.transformer, *edits):
            assert torch.equal(replay(flux_pipe.transformer, call), stock)
        with da.apply(flux_pipe.transformer, da.SoftPAG(["L1H0"], u=1.0)):
            assert (replay(flux_pipe.transformer, call) - stock).abs().max() > 1e-4  # edited layers run dit-attn's kernels


def test_fused_qkv_after_apply_raises_and_a_fused_model_is_refused_clearly():
    from .conftest import sd3_call

    sd3_pipe = build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8)  # its own: unfuse leaves dit-attn's processors
    sd3_pipe.set_progress_bar_config(disable=True)
    transformer = sd3_pipe.transformer
    stock = sd3_call(sd3_pipe, steps=1)
    handle = da.apply(sd3_pipe, da.SoftPAG(["L1"], u=1.0))
    transformer.fuse_qkv_projections()  # swaps every processor for diffusers' fused one
    try:
        with pytest.raises(RuntimeError, match="processors were replaced after dit-attn's apply"):
            sd3_call(sd3_pipe, steps=1)
        handle.remove()
        with pytest.raises(TypeError, match="call unfuse_qkv_projections"):
            da.apply(sd3_pipe, da.SoftPAG(["L1"], u=1.0))
    finally:
        transformer.unfuse_qkv_projections()
    # unfuse put back the processors it saved (dit-attn's, released): they compute the stock attention
    assert torch.equal(sd3_call(sd3_pipe, steps=1), stock)
    with da.apply(sd3_pipe, da.SoftPAG(["L1"], u=1.0)):  # and the model can be edited again
        assert (sd3_call(sd3_pipe, steps=1) - stock).abs().max() > 1e-4
    assert torch.equal(sd3_call(sd3_pipe, steps=1), stock)


def test_processors_rebuilt_by_diffusers_compute_stock_attention_and_the_next_call_says_so(flux_pipe):
    """load_ip_adapter rebuilds the processors it does not replace as `type(p)()`: with dit-attn applied
    that must not crash inside diffusers, and the next call must not run silently without the edits."""
    from .conftest import CallRecorder, flux_call, replay

    with CallRecorder(flux_pipe) as rec:
        flux_call(flux_pipe, steps=1)
    call = rec.calls[0]
    stock = replay(flux_pipe.transformer, call)
    diffusers_processors = dict(flux_pipe.transformer.attn_processors)
    handle = da.apply(flux_pipe, da.HeadGuidance(["L1"], scale=2.0))
    rebuilt = {key: type(p)() for key, p in flux_pipe.transformer.attn_processors.items()}
    flux_pipe.transformer.set_attn_processor(rebuilt)
    with pytest.raises(RuntimeError, match="processors were replaced after dit-attn's apply"):
        flux_call(flux_pipe, steps=1)
    handle.remove()
    assert torch.equal(replay(flux_pipe.transformer, call), stock)  # the rebuilt ones edit nothing
    with da.apply(flux_pipe, da.SoftPAG(["L1H0"], u=1.0)):  # and count as stock for a new apply
        assert (replay(flux_pipe.transformer, call) - stock).abs().max() > 1e-4
    assert torch.equal(replay(flux_pipe.transformer, call), stock)
    flux_pipe.transformer.set_attn_processor(diffusers_processors)  # the session's pipeline, as it was


def test_save_pretrained_with_edits_applied_writes_the_stock_checkpoint(tmp_path):
    from diffusers import SD3Transformer2DModel

    pipe = build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8)
    stock_keys = set(pipe.transformer.state_dict())
    with da.apply(pipe, da.SoftPAG(["L1"], u=1.0), da.LocalAttention(radius=2.0, downsample=2)):
        assert any("local_pool" in name for name, _ in pipe.transformer.named_parameters())  # CLEAR's pools are in
        pipe.transformer.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == stock_keys
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), pipe.transformer.state_dict().values()))
