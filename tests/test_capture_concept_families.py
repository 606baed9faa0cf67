"""Capture(kind="concept") on Qwen-Image, Qwen-Image-Edit, FLUX.2 [klein] and [dev], HunyuanImage 2.1 and
HunyuanVideo 1.5: the image is the uncaptured one (bit for bit, CFG on and off), and every map equals
ConceptAttention computed here from stock runs.

The reference: a stock pipeline run records every attention call's q, k, v and output
(F.scaled_dot_product_attention, under a TorchFunctionMode) and the transformer's inputs; a stock pipeline
run on the concept prompt gives the concept text's transformer inputs. The concept row is then the stock
transformer run on the conditional row's inputs with that text, its attention calls changed in one way:
their image-token q, k, v are the conditional row's of the same layer and call. Each map is the softmax over
the concepts of (conditional image-token outputs · the concept's mean token output) per head.
"""
import inspect

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_attn as da

torch.set_num_threads(1)
PROMPTS = ["a large red circle on a blue background", "a cat"]
CONCEPTS = ("circles", "square", "blue")  # the tiny tokenizers split "circles" into " circle", "s"
STEPS = 2
DEV_TOKENS = 160  # FLUX.2 [dev]'s system message is 129 tokens long with the tiny tokenizer


class Attention(TorchFunctionMode):
    """Every F.scaled_dot_product_attention call's (q, k, v, out), (B, H, S, D); `shared(index, q, k, v)`
    gives the q, k, v a call runs with."""

    def __init__(self, shared=None):
        super().__init__()
        self.calls, self.shared = [], shared

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs.pop(n) for i, n in enumerate(names))
        if self.shared is not None:
            q, k, v = self.shared(len(self.calls), q, k, v)
        out = func(q, k, v, *args[3:], **kwargs)
        self.calls.append(tuple(x.detach().clone() for x in (q, k, v, out)))
        return out


class TransformerCalls:
    """Each transformer call's keyword inputs and the index of its first attention call."""

    def __init__(self, transformer, attention: Attention):
        self.transformer, self.attention, self.calls = transformer, attention, []

    def __enter__(self):
        names = list(inspect.signature(self.transformer.forward).parameters)

        def record(module, args, kwargs):  # Z-Image's pipeline passes its inputs by position
            given = {**dict(zip(names, args)), **kwargs}
            self.calls.append(({k: _clone(v) for k, v in given.items()}, len(self.attention.calls)))
        self.handle = self.transformer.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _row(value, r: int, batch: int):
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[r:r + 1]
    if isinstance(value, list) and len(value) == batch:
        return value[r:r + 1]
    return value


def _positions(ids: list[int], tokenizer, word: str) -> list[int]:
    """The shortest run of tokens that decodes to `word` (the first such run)."""
    for length in range(1, 9):
        for start in range(len(ids) - length + 1):
            if tokenizer.decode(ids[start:start + length]).strip() == word:
                return list(range(start, start + length))
    raise AssertionError(f"{word!r} not in {tokenizer.decode(ids)!r}")


# ------------------------------------------------------------------ the families
def _qwen_ids(pipe, prompt, image=None):
    text = pipe.prompt_template_encode.format(prompt)
    if image is None:
        ids = pipe.tokenizer(text)["input_ids"]
    else:  # the processor expands the template's image placeholder to the image's vision tokens
        ids = pipe.processor(text=[text], images=image, return_tensors="pt")["input_ids"][0].tolist()
    return ids[pipe.prompt_template_encode_start_idx:]


def _klein_ids(pipe, prompt, image=None):
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    return pipe.tokenizer(text)["input_ids"]


def _mistral_ids(pipe, prompt, image=None):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    messages = format_input(prompts=[prompt], system_message=pipe.system_message)
    return list(pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                                   padding="max_length", truncation=True,
                                                   max_length=DEV_TOKENS)["input_ids"][0])


def _t5_ids(pipe, prompt, image=None):
    return pipe.tokenizer(prompt)["input_ids"]


def _ovis_ids(pipe, prompt, image=None):  # the system prompt rides in the user turn; its first tokens are dropped
    return pipe.tokenizer(pipe._get_messages(prompt)[0], add_special_tokens=False)["input_ids"][pipe.user_prompt_begin_id:]


def _z_image_ids(pipe, prompt, image=None):
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    return pipe.tokenizer(text)["input_ids"]


def _hunyuan_video_ids(pipe, prompt, image=None):
    messages = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt}]
    text = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return pipe.tokenizer(text)["input_ids"][pipe.prompt_template_encode_start_idx:]


def _edit_image():
    from PIL import Image

    return Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())


def _build(name):
    if name in ("qwen_image", "qwen_image_short"):
        from dit_attn.toy.qwen_image import build_qwen_image_pipeline
        return build_qwen_image_pipeline(num_layers=2, num_heads=2, head_dim=16)
    if name == "qwen_image_edit":
        from dit_attn.toy.qwen_image import build_qwen_image_edit_pipeline
        return build_qwen_image_edit_pipeline(num_layers=2, num_heads=2, head_dim=16)
    if name == "flux2_klein":
        from dit_attn.toy.flux2 import build_flux2_klein_pipeline
        return build_flux2_klein_pipeline(num_layers=1, num_single_layers=1, num_heads=2)
    if name == "flux2_dev":
        from .test_capture_words import build_flux2_dev_pipeline
        return build_flux2_dev_pipeline()
    if name in ("hunyuan_image", "hunyuan_image_cfg"):
        from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline
        return build_hunyuan_image_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8,
                                            guidance_embeds=name == "hunyuan_image", seed=1)
    if name in ("bria", "ovis_image"):
        from dit_attn.toy.bria import build_bria_pipeline
        from dit_attn.toy.ovis_image import build_ovis_image_pipeline
        build = build_bria_pipeline if name == "bria" else build_ovis_image_pipeline
        return build(num_layers=1, num_single_layers=2, num_heads=2, head_dim=16, text_encoder=True)
    if name == "z_image":
        from dit_attn.toy.z_image import build_z_image_pipeline
        return build_z_image_pipeline(num_layers=2, num_refiner_layers=1, num_heads=2, head_dim=16)
    if name == "wan":
        from dit_attn.toy.wan import build_wan_pipeline
        return build_wan_pipeline()
    if name == "hunyuan_video15":
        from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline
        return build_hunyuan_video15_pipeline(num_layers=2, num_heads=2, head_dim=8)
    raise KeyError(name)


# name → (call arguments, CFG's arguments, the transformer's text inputs, image tokens first?, text ids)
FAMILIES = {
    "qwen_image": (dict(true_cfg_scale=1.0, max_sequence_length=32), dict(true_cfg_scale=3.0, negative_prompt="a green cat"),
                   ("encoder_hidden_states", "encoder_hidden_states_mask"), False, _qwen_ids),
    # prompts shorter than the concept prompt: the concept call pads the conditional rows' text (masked)
    "qwen_image_short": (dict(true_cfg_scale=1.0, max_sequence_length=32), dict(true_cfg_scale=3.0, negative_prompt="a cat"),
                         ("encoder_hidden_states", "encoder_hidden_states_mask"), False, _qwen_ids),
    "qwen_image_edit": (dict(true_cfg_scale=1.0), dict(true_cfg_scale=3.0, negative_prompt="a green cat"),
                        ("encoder_hidden_states", "encoder_hidden_states_mask"), False, _qwen_ids),
    "flux2_klein": (dict(guidance_scale=1.0, max_sequence_length=32), dict(guidance_scale=3.0),
                    ("encoder_hidden_states", "txt_ids"), False, _klein_ids),
    # FLUX.2 [dev]: guidance-distilled (one call a step), its text padded to max_sequence_length
    "flux2_dev": (dict(guidance_scale=4.0, max_sequence_length=DEV_TOKENS), None, ("encoder_hidden_states", "txt_ids"),
                  False, _mistral_ids),
    # HunyuanImage: the guidance-distilled model (one call a step) and the guider's CFG (its own calls)
    "hunyuan_image": (dict(distilled_guidance_scale=3.25), {},
                      ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
                       "encoder_attention_mask_2"), True, _qwen_ids),
    "hunyuan_image_cfg": (dict(), {}, ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
                                         "encoder_attention_mask_2"), True, _qwen_ids),
    # Bria 3.2 and Ovis-Image: FLUX.1's blocks (single blocks attend over [text ; image] too)
    "bria": (dict(guidance_scale=1.0, max_sequence_length=16), dict(guidance_scale=3.0, negative_prompt="a green cat"),
             ("encoder_hidden_states", "txt_ids"), False, _t5_ids),
    "ovis_image": (dict(guidance_scale=1.0, max_sequence_length=16), dict(guidance_scale=3.0),
                   ("encoder_hidden_states", "txt_ids"), False, _ovis_ids),
    # Z-Image: [image ; caption], per-row lists; CFG is one call, the conditional rows first
    "z_image": (dict(guidance_scale=0.0, max_sequence_length=64), dict(guidance_scale=3.0), ("cap_feats",), True,
                _z_image_ids),
    # HunyuanVideo 1.5: [video ; context]; its guider's scale 1 makes one call a step
    "hunyuan_video15": (dict(guidance_scale=1.0), dict(guidance_scale=4.0),
                        ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
                         "encoder_attention_mask_2"), True, _hunyuan_video_ids),
}


@pytest.fixture(scope="module")
def pipes():
    built = {}

    def get(name):
        if name not in built:
            built[name] = _build(name)
            built[name].set_progress_bar_config(disable=True)
        return built[name]

    if "qwen_image_edit" in FAMILIES:  # the pipeline's 1024² reference area shrunk to 32²
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module

        original = edit_module.calculate_dimensions
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))
            yield get
    else:
        yield get


def _call(pipe, name, args, prompt=None, **kwargs):
    if prompt is None:
        prompt = ["a cat", "a dog"] if name == "qwen_image_short" else PROMPTS
    extra = dict(args, **kwargs)
    size = dict(height=32, width=32)
    if name == "qwen_image_edit":  # one prompt with an image: two images per prompt make the batch of 2
        extra = dict(extra, image=_edit_image(), num_images_per_prompt=2 if not isinstance(prompt, str) else 1)
        prompt = prompt if isinstance(prompt, str) else prompt[0]
    if name == "hunyuan_video15":
        from dit_attn.toy.hunyuan_video15 import HUNYUAN_VIDEO15_RUN

        pipe.guider = pipe.guider.new(guidance_scale=extra.pop("guidance_scale"))
        size = HUNYUAN_VIDEO15_RUN
    prompt = prompt if isinstance(prompt, str) else list(prompt)  # Z-Image's pipeline extends the list it gets
    output = pipe(prompt=prompt, num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(0), **size, **extra)
    return output.frames if name == "hunyuan_video15" else output.images


def reference_maps(pipe, name, args, layers: int, cfg: bool) -> torch.Tensor:
    """(steps, rows, layers, heads, concepts, H, W) from stock runs (see the module docstring)."""
    _, _, text_inputs, image_first, text_ids = FAMILIES[name]
    with Attention() as stock, TransformerCalls(pipe.transformer, stock) as calls:
        _call(pipe, name, args)
    with Attention() as concept_run, TransformerCalls(pipe.transformer, concept_run) as concept_calls:
        _call(pipe, name, FAMILIES[name][0], prompt=" ".join(CONCEPTS))  # no CFG: one row of the concept's text
    concept_text = {k: concept_calls.calls[0][0][k] for k in text_inputs}
    per_step = len(calls.calls) // STEPS
    cfg_batch = name in ("z_image", "bria")  # CFG in one call: Z-Image's conditional rows first, Bria's last
    first_batch = len(calls.calls[0][0]["x"]) if name == "z_image" else calls.calls[0][0]["hidden_states"].shape[0]
    assert (first_batch == 4 if cfg_batch else per_step > 1) == cfg  # CFG's calls or rows
    image = _edit_image() if name == "qwen_image_edit" else None
    ids = text_ids(pipe, " ".join(CONCEPTS), image)
    columns = [_positions(ids, pipe.tokenizer, w) for w in CONCEPTS]
    steps = []
    for step in range(STEPS):
        index = step * per_step  # the step's first call: the conditional one
        kwargs, start = calls.calls[index]
        following = calls.calls[index + 1][1] if index + 1 < len(calls.calls) else len(stock.calls)
        first = following - layers  # the blocks' attention calls come last (HunyuanImage: its text refiner's first)
        refiner = first - start
        if name == "z_image":  # per-row latents (C, 1, H, W) in 2×2 patches
            batch, latents = len(kwargs["x"]), kwargs["x"][0]
            grid = (latents.shape[2] // 2, latents.shape[3] // 2)
            image_tokens = generated = grid[0] * grid[1]
        else:  # packed (B, tokens, C); HunyuanImage's (B, C, H, W) and HunyuanVideo 1.5's (B, C, F, H, W), 1×1 patches
            latents = kwargs["hidden_states"]
            batch = latents.shape[0]
            image_tokens = latents.shape[1] if latents.ndim == 3 else latents.shape[2:].numel()
            generated = image_tokens // 2 if name == "qwen_image_edit" else image_tokens  # edit: the reference follows
            side = int(generated ** 0.5)
            grid = (side, side) if latents.ndim == 3 else tuple(latents.shape[2:])
        assert batch == (4 if cfg and cfg_batch else 2)
        rows = []
        for r in (range(2, 4) if name == "bria" and cfg else range(2)):  # the conditional rows
            own = [stock.calls[first + layer] for layer in range(layers)]


            def shared(index, q, k, v):
                if index < refiner:
                    return q, k, v
                cq, ck, cv, _ = own[index - refiner]
                at = slice(0, image_tokens) if image_first else slice(q.shape[2] - image_tokens, None)
                out = []
                for x, c in ((q, cq), (k, ck), (v, cv)):
                    x = x.clone()
                    x[:, :, at] = c[r:r + 1, :, at if image_first else slice(c.shape[2] - image_tokens, None)]
                    out.append(x)
                return out

            call = {key: _row(value, r, batch) for key, value in kwargs.items()}
            call.update(concept_text)
            with torch.no_grad(), Attention(shared) as concept:
                pipe.transformer(**call)
            maps = []
            for layer in range(layers):
                cond_out = own[layer][3][r]  # (heads, S, D)
                seq = cond_out.shape[1]
                start = 0 if image_first else seq - image_tokens
                image_out = cond_out[:, start:start + generated]
                out = concept.calls[refiner + layer][3][0]
                text_start = image_tokens if image_first else 0
                vectors = torch.stack([out[:, [text_start + c for c in cols]].mean(1) for cols in columns], dim=1)
                scores = torch.softmax(image_out.double() @ vectors.double().transpose(-1, -2), dim=-1)
                maps.append(scores.transpose(1, 2).unflatten(-1, grid))
            rows.append(torch.stack(maps))
        steps.append(torch.stack(rows))
    return torch.stack(steps).float()


CASES = [  # (family, CFG on, captured layers: None = all)
    ("qwen_image", False, None), ("qwen_image", True, None), ("qwen_image", False, [1]),
    ("qwen_image_short", False, None), ("qwen_image_short", True, [1]),
    ("qwen_image_edit", False, None), ("qwen_image_edit", True, None),
    ("flux2_klein", False, None), ("flux2_klein", True, [1]), ("flux2_dev", False, [2, 3]),
    ("hunyuan_image", False, None), ("hunyuan_image_cfg", True, [1]),
    ("hunyuan_video15", False, None), ("hunyuan_video15", True, [1]),
    ("z_image", False, None), ("z_image", True, [1]),
    ("bria", False, None), ("bria", True, [1]), ("ovis_image", False, None), ("ovis_image", True, [2]),
]


@pytest.mark.parametrize("name,cfg,layers", CASES)
def test_concept_maps_match_the_stock_reference_and_leave_the_image(name, cfg, layers, pipes):
    """Batch 2. With a subset of layers (the last ones) the concept rows still see the conditional rows' image at
    every layer before them, as the reference's concept row does."""
    args, cfg_args, *_ = FAMILIES[name]
    pipe = pipes(name)
    args = dict(args, **(cfg_args if cfg else {}))
    plain = _call(pipe, name, args)
    with da.apply(pipe, da.Capture(kind="concept", tokens=CONCEPTS, layers=layers, reduce=None)) as handle:
        captured = _call(pipe, name, args)
        result = handle.maps
    assert torch.equal(captured, plain)
    want = reference_maps(pipe, name, args, len(da.layers(pipe)), cfg)
    if layers is not None:
        want = want[:, :, layers]
    assert result.maps.shape == want.shape and result.tokens == CONCEPTS
    assert (result.maps - want).abs().max() < 1e-5


def test_concepts_past_the_call_text_length_are_one_error(pipes):
    """FLUX.2 [klein] pads and cuts its text at max_sequence_length: concepts past it are named."""
    pipe = pipes("flux2_klein")
    many = ("circles", "square", "blue", "green", "yellow", "triangle", "large", "background")
    with da.apply(pipe, da.Capture(kind="concept", tokens=many)):
        # 3 chat-template tokens, then the concepts (circles: 2 tokens): 8 tokens hold the first four
        with pytest.raises(ValueError, match=r"the concepts \['yellow', 'triangle', 'large', 'background'\] lie past "
                                             r"this call's 8 text tokens"):
            _call(pipe, "flux2_klein", dict(FAMILIES["flux2_klein"][0], max_sequence_length=8))


@pytest.mark.parametrize("name", ["qwen_image", "hunyuan_video15", "wan"])
def test_cli_writes_concept_maps_of_a_capture_run(name, pipes, tmp_path, capsys):
    """`dit-attn maps --kind concept` on a saved model: one overlay per layer and concept, each entry's mean the
    mean of a da.Capture run's map (heads averaged) with the same call."""
    import json

    from diffusers import DiffusionPipeline

    from dit_attn.cli.main import main
    from dit_attn.loading import call_defaults

    model = tmp_path / "model"
    pipes(name).save_pretrained(model)
    size = {"hunyuan_video15": ["--size", "16", "--frames", "5"], "wan": ["--size", "32", "--frames", "5"]}.get(
        name, ["--size", "32"])
    suffix = "png" if name == "qwen_image" else "webp"
    out = tmp_path / "maps"
    assert main(["maps", PROMPTS[0], "--model", str(model), "--kind", "concept", "--words", "circle,sky", "--layers", "1",
                 "--steps", "2", "--seed", "3", *size, "--out", str(out)]) == 0
    capsys.readouterr()
    data = json.load(open(out / "maps.json"))
    assert data["kind"] == "concept" and [m["file"] for m in data["maps"]] == [f"L1_circle.{suffix}", f"L1_sky.{suffix}"]
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    call = {**call_defaults(pipe), **data["call"]}
    with da.apply(pipe, da.Capture(kind="concept", tokens=["circle", "sky"], layers=[1])) as handle:
        pipe(PROMPTS[0], generator=torch.Generator().manual_seed(3), output_type="latent", **call)
        maps = handle.maps.maps[0, 0].mean(dim=0)  # (concepts, [frames,] H, W)
    for entry, values in zip(data["maps"], maps):
        assert entry["shape"] == list(values.shape) and entry["mean_probability"] == pytest.approx(float(values.mean()),
                                                                                                  abs=1e-6)


# ------------------------------------------------------------------ Wan: the text enters only as attn2's keys/values
@pytest.mark.parametrize("model,cfg", [("wan", False), ("wan", True), ("wan22", True)])
def test_wan_concept_maps_are_cross_attention_outputs_against_concept_values(model, cfg):
    """Each map: the softmax over the concepts of (the video queries' attn2 text output, before to_out) · (the mean
    of the concept's tokens' attn2 values, the stock to_v on the concept prompt's text states), per head; on
    Wan 2.2 each step's from the expert that ran it (E2: steps 2 and 3 of 4)."""
    from dit_attn.toy.wan import build_wan22_pipeline, build_wan_pipeline

    pipe = build_wan22_pipeline() if model == "wan22" else build_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    steps = 4 if model == "wan22" else STEPS
    experts = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]

    def run(prompt=PROMPTS):
        return pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=4.5 if cfg else 1.0, height=32, width=32,
                    num_frames=5, output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    plain = run()
    layer = 1
    with da.apply(pipe, da.Capture(kind="concept", tokens=CONCEPTS, layers=[layer], reduce=None)) as handle:
        assert torch.equal(run(), plain)
        result = handle.maps
    calls = []  # (its transformer, its inputs, the index of its first attention call)
    with Attention() as stock:
        hooks = [t.register_forward_pre_hook(lambda m, a, kw: calls.append((m, _clone(kw), len(stock.calls))),
                                             with_kwargs=True) for t in experts]
        try:
            run()
        finally:
            for hook in hooks:
                hook.remove()
    values = {}  # (transformer call, block) → the block's attn2 values of the concept prompt's text
    counter = {"call": -1}
    hooks = [t.register_forward_pre_hook(lambda m, a, kw: counter.update(call=counter["call"] + 1), with_kwargs=True)
             for t in experts]
    hooks += [block.attn2.to_v.register_forward_hook(
        lambda m, a, out, i=i: values.__setitem__((counter["call"], i), out.detach().clone()))
        for t in experts for i, block in enumerate(t.blocks)]
    try:
        run(" ".join(CONCEPTS))
    finally:
        for hook in hooks:
            hook.remove()
    per_step = len(calls) // steps
    assert (per_step > 1) == cfg
    ids = pipe.tokenizer(" ".join(CONCEPTS))["input_ids"]
    columns = [_positions(ids, pipe.tokenizer, w) for w in CONCEPTS]
    ran = []
    for step in range(steps):
        transformer, kwargs, first = calls[step * per_step]
        ran.append(transformer is experts[0])
        heads = transformer.blocks[layer].attn2.heads
        value = values[(step * per_step, layer)][0].unflatten(-1, (heads, -1)).transpose(0, 1)  # (heads, S, D)
        concepts = torch.stack([value[:, cols].mean(1) for cols in columns], dim=1)  # (heads, C, D)
        grid = tuple(n // p for n, p in zip(kwargs["hidden_states"].shape[2:], transformer.config.patch_size))
        out = stock.calls[first + 2 * layer + 1][3]  # attn1, attn2 per block: this block's attn2, (B, heads, N, D)
        assert out.shape[0] == 2 and out.shape[2] == grid[0] * grid[1] * grid[2]
        scores = torch.softmax(out.double() @ concepts.double().transpose(-1, -2).unsqueeze(0), dim=-1)
        want = scores.transpose(2, 3).unflatten(-1, grid).float()  # (rows, heads, C, F, H, W)
        assert (result.maps[step, :, 0] - want).abs().max() < 1e-5, step
    assert ran == ([True, True, False, False] if model == "wan22" else [True] * steps)


@pytest.mark.parametrize("name", ["flux2_klein", "hunyuan_image"])
def test_maps_tab_gives_the_concept_maps_of_a_capture_run(name, pipes, tmp_path):
    """The app's Maps tab on a saved model: one overlay per layer and concept, maps.json's values those of a
    da.Capture run (heads averaged) with the tab's call."""
    import json

    from diffusers import DiffusionPipeline

    from dit_attn.app import ModelRegistry
    from dit_attn.app.ui import AppActions
    from dit_attn.loading import call_defaults, call_pipeline
    from dit_attn.workflows.batch import pipeline_kwargs

    model = tmp_path / "model"
    pipes(name).save_pretrained(model)
    form = [str(model), PROMPTS[0], 2, 4.5, 3, "32", "", [], [], 0.5, "joint", "identity", 2.0, None, 0.0, 1.0, None, "",
            5.0, None, None]
    actions = AppActions(ModelRegistry([str(model)], embedded=("demo",)), str(tmp_path / "out"))
    _, gallery, index = actions.maps(*form, "concept", "circles, sky", "1", "", None, None, True,
                                     progress=lambda *a, **k: None)
    data = json.load(open(index))
    assert data["kind"] == "concept" and [(m["token"], m["layer"]) for m in data["maps"]] == [("circles", "1"), ("sky", "1")]
    assert len(gallery) == 2
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    call = {**call_defaults(pipe), **pipeline_kwargs(data)}  # the tab's settings as the pipeline's arguments
    with da.apply(pipe, da.Capture(kind="concept", tokens=["circles", "sky"], layers=[1])) as handle:
        call_pipeline(pipe, prompt=PROMPTS[0], generator=torch.Generator().manual_seed(3), output_type="latent", **call)
        maps = handle.maps.maps[0, 0].mean(dim=0)  # (concepts, H, W)
    for entry, values in zip(data["maps"], maps):
        assert np.allclose(entry["values"], values.numpy(), atol=1e-6)
