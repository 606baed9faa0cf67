import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

torch.set_num_threads(1)

SIZE = dict(height=32, width=32)


@pytest.fixture(scope="session")
def sd3_pipe():
    pipe = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd35_pipe():
    pipe = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def flux_pipe():
    pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_call(pipe, prompt="a red circle", steps=3, seed=0, **kwargs):
    args = dict(num_inference_steps=steps, guidance_scale=4.0, max_sequence_length=8, output_type="latent", **SIZE)
    args.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).images


def flux_call(pipe, prompt="a red circle", steps=3, seed=0, **kwargs):
    args = dict(num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=8, output_type="latent", **SIZE)
    args.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).images


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):  # per-row lists (Z-Image's x, cap_feats)
        return [_copy(v) for v in value]
    return value


class CallRecorder:
    """Records every stock-sized transformer call (inputs) and every scheduler step (ε it got).

    Uses torch forward pre-hooks and an instance-level `scheduler.step`, both set before
    dit-attn is applied, so they see what the pipeline itself passes.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: list[dict] = []
        self.steps: list[torch.Tensor] = []

    def __enter__(self):
        names = list(inspect.signature(self.pipe.transformer.forward).parameters)

        def record_call(module, args, kwargs):
            self.calls.append({k: _copy(v) for k, v in {**dict(zip(names, args)), **kwargs}.items()})

        self._hook = self.pipe.transformer.register_forward_pre_hook(record_call, with_kwargs=True)
        original = self.pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            self.steps.append(model_output.clone())
            return original(model_output, *args, **kwargs)

        self.pipe.scheduler.step = step
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        del self.pipe.scheduler.step


def replay(transformer, call: dict, rows=None) -> torch.Tensor:
    """Run a recorded transformer call again (optionally on a subset of its rows)."""
    kwargs = dict(call)
    if rows is not None:
        n = kwargs["hidden_states"].shape[0]
        for key, value in list(kwargs.items()):
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n and key not in ("img_ids", "txt_ids"):
                kwargs[key] = value[rows]
    kwargs["return_dict"] = False
    with torch.no_grad():
        return transformer(**kwargs)[0]


class CountSDPA(TorchFunctionMode):
    """Counts the F.scaled_dot_product_attention calls made inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def check_shared_image_keys(pipe, call, nag, saved_sdpa_calls: int, monkeypatch) -> None:
    """NAG's token path with the image keys' part of Z⁺ and Z⁻ computed once (merged by log-sum-exp), the same with
    any masked text's part by matrix products (`kernels.lse.masked_lse`, what CUDA runs), and with two attention
    calls per NAG layer each give the row path's steps, and the merge saves `saved_sdpa_calls` SDPA calls."""
    import dit_attn as da
    from dit_attn.hooks import nag_tokens, nag_tokens_flux
    from dit_attn.kernels import lse

    def run():
        with CallRecorder(pipe) as rec, da.apply(pipe, nag), CountSDPA() as sdpa:
            call()
        return rec.steps, sdpa.count

    monkeypatch.setattr(nag_tokens_flux, "SHARED_IMAGE_KEYS_FROM", 0)
    shared, shared_sdpa = run()
    with monkeypatch.context() as patch:
        fused = lse.attention_with_lse
        patch.setattr(lse, "attention_with_lse",
                      lambda q, k, v, bias=None: fused(q, k, v) if bias is None else lse.masked_lse(q, k, v, bias))
        by_products, _ = run()
    monkeypatch.setattr(nag_tokens_flux, "SHARED_IMAGE_KEYS_FROM", None)
    two_calls, two_calls_sdpa = run()
    assert two_calls_sdpa - shared_sdpa == saved_sdpa_calls
    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    rows, _ = run()
    for a, b, c, want in zip(shared, by_products, two_calls, rows, strict=True):
        assert max((x - want).abs().max() for x in (a, b, c)) <= 1e-5


class PerturbSDPA(TorchFunctionMode):
    """Independent SoftPAG at u = 1 in one attention module: the selected heads' SDPA output is
    replaced by V (identity) or by softmax(mask)·V (uniform: constant logits, the mask kept)."""

    def __init__(self, module, heads, target="identity"):
        super().__init__()
        self.heads, self.target, self.inside = heads, target, False
        self.handles = [module.register_forward_pre_hook(lambda *a: self._set(True)),
                        module.register_forward_hook(lambda *a: self._set(False))]

    def _set(self, value):
        self.inside = value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and self.inside:
            named = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs
            q, k, v, mask = named["query"], named["key"], named["value"], named.get("attn_mask")
            heads = list(self.heads)
            if self.target == "identity":
                target = v[:, heads]
            else:
                if mask is None:
                    bias = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2])
                elif mask.dtype == torch.bool:  # a keep-mask: masked keys get no weight
                    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
                else:
                    bias = mask.float()
                target = torch.softmax(bias.expand(q.shape[0], 1, q.shape[2], k.shape[2]), dim=-1) @ v[:, heads]
            out = out.clone()
            out[:, heads] = target.to(out.dtype)
        return out

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


def flux_attention_module(pipe, layer):
    """The attention module of a FLUX-layout layer (double blocks, then single blocks)."""
    transformer = pipe.transformer
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    return blocks[layer].attn
