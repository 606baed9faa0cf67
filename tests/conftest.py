import pytest
import torch

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
        def record_call(module, args, kwargs):
            self.calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

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
