"""Wan 2.2 two-expert pipelines: `transformer` (E1) runs the steps at or above the boundary timestep,
`transformer_2` (E2) the rest. Edits install on both experts (or the addressed one); guided steps equal the
explicit computation from each expert's recorded stock calls across the boundary; an expert no edit addresses
stays bit-exact stock; heads are addressed per expert ("E1:L1H0")."""
import inspect

import pytest
import torch

import dit_attn as da
from dit_attn.cli import main
from PIL import Image

from dit_attn.toy.wan import WAN_RUN, build_wan22_i2v_pipeline, build_wan22_pipeline, build_wan_pipeline

from .conftest import PerturbSDPA, replay

torch.set_num_threads(1)
STEPS = 4  # the toy boundary puts steps 0, 1 on E1 and 2, 3 on E2


@pytest.fixture(scope="module")
def pipe():
    pipe = build_wan22_pipeline(num_layers=2, num_heads=2, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def experts_of(pipe):
    return {"E1": pipe.transformer, "E2": pipe.transformer_2}


class ExpertRecorder:
    """Every call each expert gets (its inputs, as the pipeline passes them, and its output) and every ε the
    scheduler gets; torch hooks and an instance `scheduler.step`, set before dit-attn is applied."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: list[tuple[str, dict]] = []
        self.outputs: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []

    def __enter__(self):
        self._hooks = []
        for name, model in experts_of(self.pipe).items():
            names = list(inspect.signature(model.forward).parameters)

            def before(module, args, kwargs, name=name, names=names):
                call = {**dict(zip(names, args)), **kwargs}
                self.calls.append((name, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}))

            def after(module, args, kwargs, output):
                self.outputs.append(output[0].clone())

            self._hooks += [model.register_forward_pre_hook(before, with_kwargs=True),
                            model.register_forward_hook(after, with_kwargs=True)]
        original = self.pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            self.steps.append(model_output.clone())
            return original(model_output, *args, **kwargs)

        self.pipe.scheduler.step = step
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        del self.pipe.scheduler.step


def run(pipe, prompt="a red circle", guidance_scale=3.0, **kwargs):
    args = dict(num_inference_steps=STEPS, output_type="latent", guidance_scale=guidance_scale, **WAN_RUN) | kwargs
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **args).frames


def recorded(pipe, *edits, **kwargs):
    with ExpertRecorder(pipe) as rec:
        if edits:
            with da.apply(pipe, *edits):
                run(pipe, **kwargs)
        else:
            run(pipe, **kwargs)
    return rec


def test_layer_maps_and_addressing_errors(pipe):
    assert [(l.index, l.name, l.heads) for l in da.layers(pipe, expert="E2")] == [(0, "blocks.0.attn1", 2),
                                                                                   (1, "blocks.1.attn1", 2)]
    assert da.layers(pipe) == da.layers(pipe.transformer)
    assert da.experts(pipe) == {"E1": pipe.transformer, "E2": pipe.transformer_2}
    assert da.experts(build_wan_pipeline()).keys() == {""}
    with pytest.raises(ValueError, match="unknown expert in 'E3:L0H0': the experts are E1 .* and E2"):
        da.SoftPAG(heads=["E3:L0H0"])
    with pytest.raises(ValueError, match=r"head 2 of layer 1 \(from 'L1H2'\) out of range: valid heads are 0-1"):
        da.apply(pipe, da.SoftPAG(heads=["E2:L1H2"]))
    with pytest.raises(ValueError, match="'E1:L0H0' addresses expert E1, which this apply does not edit \\(it edits E2\\)"):
        da.apply(pipe, da.SoftPAG(heads=["E1:L0H0"]), expert="E2")
    with pytest.raises(ValueError, match="expert must be one of E1, E2 \\(or None: both\\), got 'E3'"):
        da.apply(pipe, da.SoftPAG(heads=["L0H0"]), expert="E3")
    one = build_wan_pipeline()
    with pytest.raises(ValueError, match="'E1:L0H0' addresses an expert: .* this model has one transformer"):
        da.apply(one, da.SoftPAG(heads=["E1:L0H0"]))
    with pytest.raises(ValueError, match="expert='E1' is for two-expert pipelines"):
        da.apply(one, da.SoftPAG(heads=["L0H0"]), expert="E1")
    uneven = build_wan22_pipeline(num_layers=2, num_layers_2=3)
    with pytest.raises(ValueError, match="layer maps differ \\(E1: 2 layers of 2 heads; E2: 3 layers of 2 heads\\): "
                                         "address each expert's heads as 'E1:L3H2' or 'E2:L3H2'"):
        da.apply(uneven, da.HeadGuidance(heads=["L0H0"]))
    with pytest.raises(ValueError, match="layer maps differ and TextPatch, TextGuard and NAG address layers by index"):
        da.apply(uneven, da.NAG(negative_prompt="blurry"))
    with da.apply(uneven, da.SoftPAG(heads=["E1:L1", "E2:L2H1"])) as handle:
        assert set(handle.experts["E2"].state.model_edits) == {2} and set(handle.experts["E1"].state.model_edits) == {1}
    with pytest.raises(RuntimeError, match="already edited by dit-attn"):
        with da.apply(pipe.transformer_2, da.SoftPAG(heads=["L0H0"])):
            da.apply(pipe, da.SoftPAG(heads=["E1:L0H0"]))


def test_zero_strength_edits_are_stock(pipe):
    stock = recorded(pipe)
    edited = recorded(pipe, da.SoftPAG(heads=["L0", "E2:L1H1"], u=0.0), da.LocalAttention(radius=(9, 9, 9)))
    assert [name for name, _ in edited.calls] == [name for name, _ in stock.calls] == ["E1"] * 4 + ["E2"] * 4
    assert all((a - b).abs().max() == 0.0 for a, b in zip(stock.steps, edited.steps))
    # scale 0 still runs the conditional rows in a call widened to 2 rows (other matmul blocking than 1 row)
    guided = recorded(pipe, da.HeadGuidance(heads=["L1H0"], scale=0.0))
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(stock.steps, guided.steps))


def explicit_steps(pipe, rec, heads: dict, cfg: bool, scales: dict, pag_scale: float):
    """ε the scheduler should get: per step, the active expert's CFG of its recorded calls, then
    s·(ε_c − ε_p) with ε_p from that expert with the heads' SDPA outputs replaced by V."""
    per_step = 2 if cfg else 1
    models = experts_of(pipe)
    out = []
    for step in range(len(rec.steps)):
        name, cond = rec.calls[per_step * step]
        model = models[name]
        eps_c = replay(model, cond)
        modes = [PerturbSDPA(model.blocks[layer].attn1, hs) for layer, hs in heads[name].items()]
        for mode in modes:
            mode.__enter__()
        try:
            eps_p = replay(model, cond)
        finally:
            for mode in reversed(modes):
                mode.__exit__(None, None, None)
        base = eps_c
        if cfg:
            eps_u = replay(model, rec.calls[per_step * step + 1][1])
            base = eps_u + scales[name] * (eps_c - eps_u)
        out.append(base + pag_scale * (eps_c - eps_p))
    return out


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
def test_guided_steps_equal_explicit_across_the_boundary(pipe, guidance_scale):
    cfg = guidance_scale > 1.0
    extra = dict(guidance_scale_2=2.0) if cfg else {}
    edit = da.HeadGuidance(heads=["E1:L1H1", "L0H0", "E2:L1"], scale=2.0, u=1.0)
    stock = recorded(pipe, guidance_scale=guidance_scale, **extra)
    rec = recorded(pipe, edit, guidance_scale=guidance_scale, **extra)
    per_step = 2 if cfg else 1
    assert [name for name, _ in rec.calls] == [name for name, _ in stock.calls] == \
        ["E1"] * 2 * per_step + ["E2"] * 2 * per_step
    assert (rec.steps[0] - stock.steps[0]).abs().max() > 1e-3
    heads = {"E1": {0: [0], 1: [1]}, "E2": {0: [0], 1: [0, 1]}}
    want = explicit_steps(pipe, rec, heads, cfg, {"E1": guidance_scale, "E2": 2.0}, edit.scale)
    for eps, expected in zip(rec.steps, want):
        assert (eps - expected).abs().max() < 1e-5


def test_image_to_video_guided_steps_equal_explicit_across_the_boundary():
    """Wan 2.2 I2V (the image as condition channels, no image encoder)."""
    pipe = build_wan22_i2v_pipeline()
    pipe.set_progress_bar_config(disable=True)
    edit = da.HeadGuidance(heads=["E1:L0H1", "E2:L1H0"], scale=2.0)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    rec = recorded(pipe, edit, image=image)
    assert [name for name, _ in rec.calls] == ["E1"] * 4 + ["E2"] * 4
    assert rec.calls[0][1]["hidden_states"].shape[1] == 36
    want = explicit_steps(pipe, rec, {"E1": {0: [1]}, "E2": {1: [0]}}, True, {"E1": 3.0, "E2": 3.0}, edit.scale)
    for eps, expected in zip(rec.steps, want):
        assert (eps - expected).abs().max() < 1e-5


def test_one_expert_edits_leave_the_other_bit_exact_stock(pipe):
    stock = recorded(pipe)
    # HeadGuidance on E2 only: E1's steps are the stock run's, bit for bit, and E1 keeps its stock processors
    with ExpertRecorder(pipe) as rec, da.apply(pipe, da.HeadGuidance(heads=["E2:L1H1"], scale=2.0)) as handle:
        assert list(handle.experts) == ["E2"]
        assert not getattr(pipe.transformer, "_diffusers_hook", None) or not pipe.transformer._diffusers_hook.hooks
        assert type(pipe.transformer.blocks[1].attn1.processor).__name__ == "WanAttnProcessor"
        run(pipe)
    assert all((a - b).abs().max() == 0.0 for a, b in zip(stock.steps[:2], rec.steps[:2]))
    assert (stock.steps[2] - rec.steps[2]).abs().max() > 1e-3
    # SoftPAG on E1 only: each E2 call's output is the stock E2 on the same inputs, bit for bit
    with ExpertRecorder(pipe) as rec, da.apply(pipe, da.SoftPAG(heads=["E1:L0"], u=1.0)):
        run(pipe)
    pairs = list(zip(rec.calls, rec.outputs))
    for (name, call), output in pairs:
        if name == "E2":
            assert (replay(pipe.transformer_2, call) - output).abs().max() == 0.0
    name, call = pairs[0][0]
    assert name == "E1" and (replay(pipe.transformer, call) - pairs[0][1]).abs().max() > 1e-4


def test_text_patch_on_one_expert_runs_the_source_prompt_there(pipe):
    """TextPatch on every layer of E2 (expert="E2"): E2's conditional calls equal E2 on the source prompt's
    text states; E1's steps stay the stock run's."""
    source = recorded(pipe, prompt="a blue square cat")
    stock = recorded(pipe)
    with ExpertRecorder(pipe) as rec, da.apply(pipe, da.TextPatch(layers=[0, 1], source_prompt="a blue square cat"),
                                              expert="E2"):
        run(pipe)
    assert all((a - b).abs().max() == 0.0 for a, b in zip(stock.steps[:2], rec.steps[:2]))
    source_text = source.calls[0][1]["encoder_hidden_states"]
    assert len(rec.calls) == len(stock.calls) == 8
    for n, ((name, call), output) in enumerate(zip(rec.calls, rec.outputs)):
        if name == "E2":
            conditional = n % 2 == 0
            text = source_text if conditional else call["encoder_hidden_states"]
            want = replay(pipe.transformer_2, call | {"encoder_hidden_states": text})
            assert (output - want).abs().max() < 1e-5, n
            if conditional:
                assert (output - replay(pipe.transformer_2, call)).abs().max() > 1e-4


def test_edits_install_on_both_experts_and_remove_restores_both(pipe):
    before = {name: dict(model.attn_processors) for name, model in experts_of(pipe).items()}
    handle = da.apply(pipe, da.SoftPAG(heads=["L1H0"], u=0.5), da.NAG(negative_prompt="blurry"),
                      da.LocalAttention(radius=(1, 1, 1), layers=[0]))
    for name, model in experts_of(pipe).items():
        part = handle.experts[name]
        assert part.transformer is model and part.state.local is not None and part.state.nag is not None
        assert type(model.blocks[0].attn2.processor).__name__ == "WanCrossAttnProcessor"
        assert set(part.state.model_edits) == {1}
    handle.remove()
    handle.remove()
    for name, model in experts_of(pipe).items():
        assert all(model.attn_processors[k] is v for k, v in before[name].items())
        assert not model._diffusers_hook.hooks
    with da.apply(pipe, da.NAG(negative_prompt="blurry"), expert="E2") as handle:
        assert list(handle.experts) == ["E2"]
        assert type(pipe.transformer.blocks[0].attn2.processor).__name__ == "WanAttnProcessor"
        assert type(pipe.transformer_2.blocks[0].attn2.processor).__name__ == "WanCrossAttnProcessor"


def test_heads_command_prints_each_experts_map(tmp_path, capsys):
    build_wan22_pipeline(num_layers=2, num_layers_2=3, num_heads=2).save_pretrained(tmp_path / "wan22")
    assert main(["heads", "--model", str(tmp_path / "wan22")]) == 0
    out = capsys.readouterr().out
    first, second = out.split("\n\n")
    assert first.startswith("E1 (transformer; address its heads as E1:L<layer>H<head>):")
    assert "    1  self       2   12  blocks.1.attn1" in first and first.rstrip().endswith("2 layers, 4 heads")
    assert second.startswith("E2 (transformer_2;") and second.rstrip().endswith("3 layers, 6 heads")
