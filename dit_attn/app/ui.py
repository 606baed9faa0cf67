"""The page: shared settings on the left, one tab per feature on the right."""
from __future__ import annotations

import functools
import html
import logging

import gradio as gr

from .generation import difference_image, run_pipeline, save_png, with_actual_size
from .models import LoadedModel, ModelRegistry
from .settings import MAX_STEPS, build_settings, collect_heads, edits_for

logger = logging.getLogger(__name__)

# Small models draw 32-64 px images: show them filling the frame, with visible pixels.
CSS = ".dit-attn-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"

PLACEHOLDERS = {
    "Head atlas": "Not in the page yet (issue 6). Make an atlas of what each head does from the command line: "
                  "`dit-attn atlas --objective judge --prompts prompts.txt --out atlas` writes atlas.png and atlas.html.",
    "Text edit": "Text editing (localize the layers that draw text and patch them) arrives in the page with issue 7.",
}


def readable_errors(handler):
    """Bad input reaches the page as its message in an error box, never as a stack trace."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (ValueError, TypeError) as err:
            raise gr.Error(html.escape(str(err), quote=False), print_exception=False) from None
        except RuntimeError as err:  # e.g. out of memory at a large size
            logger.exception("generation failed")
            raise gr.Error(html.escape(f"generation failed: {err}", quote=False), print_exception=False) from None

    return wrapper


def _presets_info(model: LoadedModel) -> str:
    if model.presets():
        return f"named heads for {model.family} models"
    return f"no {model.family} preset fits this model's layer/head map"


class AppActions:
    """What the page's buttons and selectors do."""

    def __init__(self, registry: ModelRegistry, output_dir: str):
        self.registry = registry
        self.output_dir = output_dir

    def _settings(self, model_choice, prompt, steps, cfg, seed, size, heads_text, picked, presets, u, scope, target, pag_scale,
                  local_radius):
        heads = collect_heads(heads_text, picked, presets)  # syntax errors before a model loads
        model = self.registry.get(model_choice)
        settings = build_settings(model, prompt=prompt, steps=steps, cfg=cfg, seed=seed, size=size, heads=heads,
                                  pag_scale=pag_scale, u=u, scope=scope, target=target, local_radius=local_radius,
                                  dtype=self.registry.dtype_name)
        return model, settings

    def generate(self, model_choice, prompt, steps, cfg, seed, size, heads_text, picked, presets, u, scope, target, pag_scale,
                 local_radius, progress=gr.Progress()):
        progress(0, desc="loading model")
        model, settings = self._settings(model_choice, prompt, steps, cfg, seed, size, heads_text, picked, presets, u, scope,
                                         target, pag_scale, local_radius)
        total = settings["steps"]
        image = run_pipeline(model, settings, on_step=lambda done: progress((done, total), desc="denoising", unit="steps"))
        settings = with_actual_size(settings, image)
        return save_png(image, settings, self.output_dir, "image"), settings

    def compare(self, model_choice, prompt, steps, cfg, seed, size, heads_text, picked, presets, u, scope, target, pag_scale,
                local_radius, progress=gr.Progress()):
        progress(0, desc="loading model")
        model, edited = self._settings(model_choice, prompt, steps, cfg, seed, size, heads_text, picked, presets, u, scope,
                                       target, pag_scale, local_radius)
        if not edits_for(edited):
            raise ValueError("Compare needs an edit: type or pick at least one head (e.g. L1H0), or set a local attention radius")
        plain = {**edited, "heads": [], "local_radius": None}
        total = 2 * edited["steps"]
        without = run_pipeline(model, plain, on_step=lambda done: progress((done, total), desc="without the edit", unit="steps"))
        edited_image = run_pipeline(model, edited, on_step=lambda done: progress((edited["steps"] + done, total),
                                                                                 desc="with the edit", unit="steps"))
        plain, edited = with_actual_size(plain, without), with_actual_size(edited, edited_image)
        difference, peak, gain = difference_image(without, edited_image)
        difference_settings = {**edited, "image": "difference", "largest_difference": peak, "gain": round(gain, 4)}
        summary = (f"Largest pixel difference: {peak}/255, shown ×{gain:.1f} (white = largest)." if peak
                   else "The edit changed no pixel at this setting.")
        return (save_png(without, plain, self.output_dir, "without"), save_png(edited_image, edited, self.output_dir, "with"),
                save_png(difference, difference_settings, self.output_dir, "difference"), summary)

    def sets(self, model_choice, steps, cfg, seed, size, layout, panel_text, task_tag, summary, reference, reference_panel,
             progress=gr.Progress()):
        """An in-context set: one caption line a panel, optional reference image for one panel (resized to the panel)."""
        from ..cli import parse_size
        from ..ic import Layout, caption, generate_set

        progress(0, desc="loading model")
        layout = Layout.parse(layout or "1x2")
        text = caption([line.strip() for line in (panel_text or "").splitlines() if line.strip()], layout,
                       task_tag=(task_tag or "").strip() or None, summary=(summary or "").strip() or None)
        if not 1 <= int(steps) <= MAX_STEPS:
            raise ValueError(f"steps must be in 1-{MAX_STEPS}, got {steps}")
        model = self.registry.get(model_choice)
        pipe = model.pipe
        if size and str(size).strip():
            height, width = parse_size(str(size))
        else:
            side = int(pipe.default_sample_size * pipe.vae_scale_factor)
            height, width = layout.rows * side, layout.cols * side
        references = {}
        if reference is not None:
            panel = int(reference_panel or 0)
            panel_h, panel_w = layout.check_size(height, width)
            references[panel] = reference.convert("RGB").resize((panel_w, panel_h))
        total = int(steps)

        def step_ended(_pipe, step, timestep, tensors):
            progress((step + 1, total), desc="denoising", unit="steps")
            return {}

        with model.lock:
            result = generate_set(pipe, text, layout, size=(height, width), reference=references or None, seed=int(seed),
                                  num_inference_steps=total, callback_on_step_end=step_ended,
                                  **({"guidance_scale": float(cfg)} if cfg is not None else {}))
        settings = {**result.settings, "model": model.choice, "steps": total, "cfg": cfg}
        canvas = save_png(result.canvas, settings, self.output_dir, "set")
        panels = [save_png(p, {**settings, "panel": k}, self.output_dir, f"panel-{k}") for k, p in enumerate(result.panels)]
        return canvas, panels, text

    def model_changed(self, model_choice):
        model = self.registry.get(model_choice)
        return (gr.update(choices=model.head_choices(), value=[]),
                gr.update(choices=model.presets(), value=[], info=_presets_info(model)),
                model.summary())


def _image(label: str, elem_id: str) -> gr.Image:
    return gr.Image(label=label, type="filepath", format="png", interactive=False, buttons=["download", "fullscreen"],
                    height=256, elem_id=elem_id, elem_classes=["dit-attn-image"])


def build_blocks(registry: ModelRegistry, output_dir: str) -> gr.Blocks:
    actions = AppActions(registry, output_dir)
    first = registry.get(registry.default)
    with gr.Blocks(title="dit-attn", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("# dit-attn\nHead-level perturbation guidance on diffusion transformers, in your browser.")
        with gr.Row():
            model_choice = gr.Dropdown(registry.choices, value=registry.default, label="Model", scale=1,
                                       info="embedded models and the directories allowed at launch (--model-dir)")
            model_summary = gr.Markdown(first.summary())
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on a white background", elem_id="prompt")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="steps")
                    cfg = gr.Number(value=4.5, minimum=0, label="CFG scale")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    size = gr.Textbox(label="Size", placeholder="model default", info="N or WIDTHxHEIGHT", elem_id="size")
                with gr.Accordion("Head guidance", open=True):
                    heads_text = gr.Textbox(label="Heads", placeholder="e.g. L1H0, L2", elem_id="heads",
                                            info="L<layer>H<head>, or L<layer> for all heads of a layer; empty = no guidance")
                    with gr.Accordion("Layers × heads picker", open=False):
                        picked = gr.CheckboxGroup(first.head_choices(), label="Heads (layer, head)", elem_id="head-picker")
                    presets = gr.Dropdown(first.presets(), value=[], multiselect=True, label="Presets", info=_presets_info(first))
                    pag_scale = gr.Slider(0, 20, value=3.0, step=0.1, label="Guidance scale s")
                    u = gr.Slider(0, 1, value=1.0, step=0.05, label="u (perturbation strength)")
                    with gr.Row():
                        scope = gr.Radio(["joint", "image"], value="joint", label="Scope")
                        target = gr.Radio(["identity", "uniform"], value="identity", label="Target")
                local_radius = gr.Number(value=None, label="Local attention radius (tokens)", elem_id="local-radius",
                                         info="CLEAR: image tokens attend within this radius and to all text; 0 or empty = full attention")
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                        image = _image("Image", "generate-image")
                        settings_view = gr.JSON(label="Settings (also inside the PNG)")
                    with gr.Tab("Compare", id="compare"):
                        gr.Markdown("Same seed and settings, without and with the edits (head guidance, local attention), "
                                    "and their difference.")
                        compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                        with gr.Row():
                            without = _image("Without the edit", "compare-without")
                            with_edit = _image("With the edit", "compare-with")
                        difference = _image("Difference (amplified)", "compare-difference")
                        difference_note = gr.Markdown()
                    with gr.Tab("Sets", id="sets"):
                        gr.Markdown("In-context sets: one caption line a panel, joined as `[TASK] summary; [LEFT] ...; "
                                    "[RIGHT] ...`. A reference image keeps its panel (resized to the panel) while the "
                                    "others are generated. Uses the model, steps, CFG, seed and size (the whole canvas) "
                                    "on the left.")
                        with gr.Row():
                            set_layout = gr.Textbox(value="1x2", label="Layout", info="ROWSxCOLS", elem_id="set-layout")
                            set_task = gr.Textbox(value="SET", label="Task tag", elem_id="set-task")
                            set_summary = gr.Textbox(label="Summary", placeholder="two panels of the same circle",
                                                     elem_id="set-summary")
                        set_panels = gr.Textbox(label="Panel captions (one a line, row by row)", lines=3,
                                                elem_id="set-panels")
                        with gr.Row():
                            set_reference = gr.Image(label="Reference panel (optional)", type="pil", sources=["upload"],
                                                     height=160, elem_id="set-reference")
                            set_reference_panel = gr.Number(value=0, precision=0, minimum=0, label="Reference panel index",
                                                            info="0-based, row by row")
                        sets_button = gr.Button("Generate set", variant="primary", elem_id="sets-button")
                        set_canvas = _image("Canvas", "set-canvas")
                        set_gallery = gr.Gallery(label="Panels", columns=4, height=200, elem_id="set-panels-gallery")
                        set_caption_view = gr.Textbox(label="Caption used", interactive=False)
                    for title, text in PLACEHOLDERS.items():
                        with gr.Tab(title):
                            gr.Markdown(text)

        inputs = [model_choice, prompt, steps, cfg, seed, size, heads_text, picked, presets, u, scope, target, pag_scale,
                  local_radius]
        generate_button.click(readable_errors(actions.generate), inputs, [image, settings_view], api_name="generate")
        compare_button.click(readable_errors(actions.compare), inputs, [without, with_edit, difference, difference_note],
                             api_name="compare")
        sets_button.click(readable_errors(actions.sets), [model_choice, steps, cfg, seed, size, set_layout, set_panels, set_task,
                                                          set_summary, set_reference, set_reference_panel],
                          [set_canvas, set_gallery, set_caption_view], api_name="sets")
        model_choice.change(readable_errors(actions.model_changed), [model_choice], [picked, presets, model_summary],
                            api_visibility="private")
    return blocks
