"""The page: shared settings on the left, one tab per feature on the right."""
from __future__ import annotations

import abc
import functools
import gc
import html
import inspect
import logging

import gradio as gr
import pydantic
import torch
from PIL import Image

from ..io import slug
from ..video import DEFAULT_FPS
from ..limits import (MAX_LIST_ITEMS, MAX_STEPS, MAX_TEXT_CHARS, check_image_header, check_image_size, check_text,
                      check_video_size, number, whole_number)
from ..capture.words import check_words_in_prompt
from ..guidance.atlas import atlas as compute_atlas
from ..loading import call_options
from .atlas import (MAX_ATLAS_STEPS, MAX_ATLAS_WORK, MAX_PROMPTS, MAX_SEEDS, atlas_request, check_work, objective_choices,
                    read_atlas, summarize, write_atlas)
from .generation import difference_frames, difference_image, run_pipeline, save_png, save_video
from .maps import check_overlays, maps_capture, run_captured, write_maps
from .models import LoadedModel, ModelRegistry
from ..edits import TextGuard, TextPatch
from ..workflows.batch import edits_for, makes_videos, stored_settings, with_image_size, with_video_size
from .settings import (build_settings, check_form_cfg, check_form_seed, check_form_steps, collect_heads, parse_image_size)
from .text_edit import DEFAULT_SIGN_PROMPT, REPLACEMENT, parse_blocklist, run_text_edit, text_layers

logger = logging.getLogger(__name__)

# Small models draw 32-64 px images: show them filling the frame, with visible pixels.
CSS = ".dit-attn-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"

ATLAS_BATCH = 4  # heads scored per pipeline call, as `dit-attn atlas` by default


MAX_PANELS = 16  # panels of an in-context set made in the page
OUT_OF_MEMORY = ("out of memory: this request needs more memory than the server has free; try a smaller size, fewer "
                 "steps or panels (the server is still running)")


def _check_request(handler, args, kwargs) -> None:
    """Every text and list value of a request within the shared limits, before the handler runs."""
    try:
        named = inspect.signature(handler).bind_partial(*args, **kwargs).arguments
    except TypeError:
        named = {f"value {i}": value for i, value in enumerate([*args, *kwargs.values()])}
    for name, value in named.items():
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"{name} has {len(value):,} characters, more than the limit of {MAX_TEXT_CHARS:,}")
        if isinstance(value, (list, tuple)) and len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"{name} has {len(value):,} items, more than the limit of {MAX_LIST_ITEMS:,}")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def readable_errors(handler):
    """Bad input reaches the page as its message in an error box, never as a stack trace; running out of memory
    is a message too, and the server keeps serving."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            _check_request(handler, args, kwargs)
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, TypeError, NotImplementedError) as err:  # NotImplementedError: an edit refuses this model
            raise gr.Error(html.escape(str(err), quote=False), print_exception=False) from None
        except (MemoryError, torch.OutOfMemoryError):
            logger.exception("out of memory in a request")
            _free_memory()
            raise gr.Error(OUT_OF_MEMORY, print_exception=False) from None
        except RuntimeError as err:  # e.g. a backend failure at a large size
            logger.exception("generation failed")
            _free_memory()
            if "out of memory" in str(err).lower() or "can't allocate memory" in str(err).lower():
                raise gr.Error(OUT_OF_MEMORY, print_exception=False) from None
            raise gr.Error(html.escape(f"generation failed: {err}", quote=False), print_exception=False) from None
        except Exception as err:  # a bug: a short message on the page, the traceback in the server's log
            logger.exception("request failed")
            raise gr.Error(f"the request failed with an internal error ({type(err).__name__}); the server's log has "
                           "the details", print_exception=False) from None

    return wrapper


def open_reference(path, panel_size: tuple[int, int]) -> Image.Image:
    """The uploaded reference image resized to the panel (height, width): its header is checked against the machine's
    pixel budget before it is decoded."""
    if not isinstance(path, str):
        raise ValueError("the reference must be an uploaded image file")
    try:
        image = Image.open(path)
    except Exception:  # PIL raises OSError, SyntaxError, DecompressionBombError... for what is not an image
        raise ValueError("the reference is not an image file this server can read (PNG, JPEG, WebP, ...)") from None
    with image:
        check_image_header(image, "the reference image")
        try:
            rgb = image.convert("RGB")
        except Exception:
            raise ValueError("the reference image is broken: it could not be decoded") from None
    return rgb.resize((panel_size[1], panel_size[0]))


def _shown(value) -> str:
    text = repr(value)
    return html.escape(text if len(text) <= 40 else text[:37] + "...", quote=False)


class _ReadableDataModel:
    """A Gradio data model (e.g. FileData) whose validation failure, a payload of the wrong shape (text where an
    uploaded file goes), is a readable error naming the field; everything else is the model's own."""

    def __init__(self, model, field: str):
        self._model, self._field = model, field

    def model_validate(self, obj, *args, **kwargs):
        try:
            return self._model.model_validate(obj, *args, **kwargs)
        except pydantic.ValidationError:
            raise gr.Error(f"{self._field}: expected an uploaded file (from gradio_client: handle_file(path)), got "
                           f"{_shown(obj)}", print_exception=False) from None

    def __getattr__(self, name):
        return getattr(self._model, name)


def _readable(component: type, what: str = "is not a value this field takes") -> type:
    """`component` (drawn by the page as itself: a Gradio template) whose preprocessing failure, on a value the page
    never sends (text for a number, a number for a list, a file that is not an image), is a readable error naming
    the field instead of Gradio's generic one; Gradio's own refusals (bounds, choices) name the field too."""

    def field(self) -> str:
        return str(getattr(self, "label", None) or getattr(self, "elem_id", None) or component.__name__)

    def get_data_model(self):  # Gradio's own (a class attribute, or set by __init__ as gr.File does), made readable
        model = self.__dict__.get("_raw_data_model", getattr(component, "data_model", None))
        return None if model is None else _ReadableDataModel(model, field(self))

    def set_data_model(self, model) -> None:
        self.__dict__["_raw_data_model"] = model

    def preprocess(self, payload):
        try:
            return component.preprocess(self, payload)
        except gr.Error as err:
            raise gr.Error(f"{html.escape(field(self), quote=False)}: {err.message}", print_exception=False) from None
        except Image.DecompressionBombError as err:
            raise gr.Error(html.escape(f"{field(self)}: {err}", quote=False), print_exception=False) from None
        except Exception:
            raise gr.Error(f"{html.escape(field(self), quote=False)}: {_shown(payload)} {what}",
                           print_exception=False) from None

    name = f"Readable{component.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name, "__doc__": component.__doc__, "is_template": True,
                 "preprocess": preprocess, "data_model": property(get_data_model, set_data_model)}
    # Built with ABCMeta.__new__, not Gradio's ComponentMeta.__new__: that one would write a .pyi stub of this module
    # into the package (read-only once installed, and shadowing ui.py for type checkers). This class defines no
    # __init__ and no events, the only other things ComponentMeta.__new__ handles.
    return abc.ABCMeta.__new__(type(component), name, (component,), namespace)


Dropdown, Textbox, Slider, Number = (_readable(c) for c in (gr.Dropdown, gr.Textbox, gr.Slider, gr.Number))
Radio, CheckboxGroup, File, Checkbox = (_readable(c) for c in (gr.Radio, gr.CheckboxGroup, gr.File, gr.Checkbox))
ReferenceImage = _readable(gr.Image, "is not an image file this server can read (PNG, JPEG, WebP, ...)")


def _presets_info(model: LoadedModel) -> str:
    if model.presets():
        return f"named heads for {model.family} models"
    return f"no {model.family} preset fits this model's layer/head map"


class AppActions:
    """What the page's buttons and selectors do."""

    def __init__(self, registry: ModelRegistry, output_dir: str):
        self.registry = registry
        self.output_dir = output_dir

    def _settings(self, model_choice, prompt, num_inference_steps, guidance_scale, seed, size, heads_text, picked, presets,
                  u, scope, target, pag_scale, local_radius, start=0.0, end=1.0, local_downsample=None, nag_negative=None,
                  nag_scale=5.0, num_frames=None, fps=None):
        heads = collect_heads(heads_text, picked, presets)  # syntax errors before a model loads
        model = self.registry.get(model_choice)
        settings = build_settings(model, prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  seed=seed, size=size, heads=heads, pag_scale=pag_scale, u=u, scope=scope, target=target,
                                  local_radius=local_radius, start=start, end=end, local_downsample=local_downsample,
                                  nag_negative=nag_negative, nag_scale=nag_scale, dtype=self.registry.dtype_name,
                                  num_frames=num_frames, fps=fps)
        return model, settings

    def _image_model(self, model_choice, tab: str) -> LoadedModel:
        """The model of a tab that makes images only; a video model is refused in one line."""
        model = self.registry.get(model_choice)
        if makes_videos(model.pipe):
            raise ValueError(f"the {tab} tab makes images; {type(model.pipe).__name__} makes videos: use the Generate, "
                             "Compare or Maps tab (or pick an image model)")
        return model

    def generate(self, model_choice, prompt, num_inference_steps, guidance_scale, seed, size, heads_text, picked, presets, u,
                 scope, target, pag_scale, local_radius, start=0.0, end=1.0, local_downsample=None, nag_negative=None,
                 nag_scale=5.0, num_frames=None, fps=None, progress=gr.Progress()):
        progress(0, desc="loading model")
        model, settings = self._settings(model_choice, prompt, num_inference_steps, guidance_scale, seed, size, heads_text,
                                         picked, presets, u, scope, target, pag_scale, local_radius, start, end, local_downsample,
                                         nag_negative, nag_scale, num_frames, fps)
        total = settings["num_inference_steps"]
        image = run_pipeline(model, settings, on_step=lambda done: progress((done, total), desc="denoising", unit="steps"))
        kind = "video" if makes_videos(model.pipe) else "image"
        return self._save(model, image, settings, kind), self._drawn(model, settings, image)

    def _drawn(self, model: LoadedModel, settings: dict, output) -> dict:
        """Settings that record what the model made (a video: its frames' size, count and fps)."""
        return with_video_size(settings, output) if makes_videos(model.pipe) else with_image_size(settings, output)

    def _save(self, model: LoadedModel, output, settings: dict, kind: str) -> str:
        """An image as a PNG; a video's frames as an animated WebP the image element plays."""
        if makes_videos(model.pipe):
            return save_video(output, self._drawn(model, settings, output), self.output_dir, kind)
        return save_png(output, self._drawn(model, settings, output), self.output_dir, kind)

    def compare(self, model_choice, prompt, num_inference_steps, guidance_scale, seed, size, heads_text, picked, presets, u,
                scope, target, pag_scale, local_radius, start=0.0, end=1.0, local_downsample=None, nag_negative=None,
                nag_scale=5.0, num_frames=None, fps=None, progress=gr.Progress()):
        progress(0, desc="loading model")
        model, edited = self._settings(model_choice, prompt, num_inference_steps, guidance_scale, seed, size, heads_text,
                                       picked, presets, u, scope, target, pag_scale, local_radius, start, end, local_downsample,
                                       nag_negative, nag_scale, num_frames, fps)
        if not edits_for(edited):
            raise ValueError("Compare needs an edit: type or pick at least one head (e.g. L1H0), set a local attention "
                             "radius, or give a NAG negative prompt")
        plain = {**edited, "edits": []}
        steps = edited["num_inference_steps"]
        total = 2 * steps
        without = run_pipeline(model, plain, on_step=lambda done: progress((done, total), desc="without the edit", unit="steps"))
        edited_image = run_pipeline(model, edited, on_step=lambda done: progress((steps + done, total),
                                                                                 desc="with the edit", unit="steps"))
        videos = makes_videos(model.pipe)
        difference, peak, gain = (difference_frames if videos else difference_image)(without, edited_image)
        difference_settings = {**edited, "image": "difference", "largest_difference": peak, "gain": round(gain, 4)}
        what = "video" if videos else "image"
        summary = (f"Largest pixel difference: {peak}/255, shown ×{gain:.1f} (white = largest)." if peak
                   else f"The edit changed no pixel of the {what} at this setting.")
        return (self._save(model, without, plain, "without"), self._save(model, edited_image, edited, "with"),
                self._save(model, difference, difference_settings, "difference"), summary)

    def sets(self, model_choice, num_inference_steps, guidance_scale, seed, size, layout, panel_text, task_tag, summary,
             reference, reference_panel, progress=gr.Progress()):
        """An in-context set: one caption line a panel, optional reference image for one panel (resized to the panel).
        Every number and the canvas size are checked by the shared limits before the model is asked for anything."""
        from ..io import parse_size
        from ..ic import Layout, caption, generate_set

        layout = Layout.parse(check_text("layout", layout, 32) or "1x2")
        if layout.panels > MAX_PANELS:
            raise ValueError(f"a {layout} layout has {layout.panels} panels; the page makes sets of at most {MAX_PANELS}")
        text = caption([line.strip() for line in check_text("panel captions", panel_text).splitlines() if line.strip()],
                       layout, task_tag=check_text("task tag", task_tag).strip() or None,
                       summary=check_text("summary", summary).strip() or None)
        total = check_form_steps(num_inference_steps)
        seed = check_form_seed(seed)
        cfg = check_form_cfg(guidance_scale)
        panel = None
        if reference is not None:
            panel = whole_number("reference panel index", 0 if reference_panel is None else reference_panel, 0,
                                 layout.panels - 1)
        progress(0, desc="loading model")
        model = self._image_model(model_choice, "Sets")
        pipe = model.pipe
        if size is not None and str(size).strip():
            height, width = parse_size(check_text("size", size, 32))
        else:
            side = int(pipe.default_sample_size * pipe.vae_scale_factor)
            height, width = layout.rows * side, layout.cols * side
        check_image_size(pipe, height, width)  # the whole canvas, before any allocation
        references = {}
        if reference is not None:
            panel_size = layout.check_size(height, width)
            references[panel] = open_reference(reference, panel_size)

        def step_ended(_pipe, step, timestep, tensors):
            progress((step + 1, total), desc="denoising", unit="steps")
            return {}

        with model.lock:
            result = generate_set(pipe, text, layout, size=(height, width), reference=references or None, seed=seed,
                                  num_inference_steps=total, callback_on_step_end=step_ended,
                                  **({"guidance_scale": cfg} if cfg is not None else {}))
        settings = {**result.settings, "model": model.choice, "num_inference_steps": total, "guidance_scale": cfg,
                    "dtype": self.registry.dtype_name}
        canvas = save_png(result.canvas, settings, self.output_dir, "set")
        panels = [save_png(p, {**settings, "panel": k}, self.output_dir, f"panel-{k}") for k, p in enumerate(result.panels)]
        return canvas, panels, text

    def atlas(self, model_choice, objective, prompts_text, seeds_text, steps, u, scale, cfg, size, scope, target,
              maps_word=None, progress=gr.Progress(track_tqdm=True)):
        """Every head's effect on the objective (`da.atlas`), bounded to MAX_ATLAS_WORK image-steps: PNG, [HTML, JSON],
        summary. maps_word: a word of the first prompt whose map each head draws beside its change."""
        request = atlas_request(objective, prompts_text, seeds_text, steps, u, scale)
        maps_word = check_text("maps word", maps_word, 100).strip() or None
        if maps_word is not None:
            check_words_in_prompt(request.prompts[0], [maps_word])
        cfg = check_form_cfg(cfg)
        progress(0, desc="loading model")
        model = self._image_model(model_choice, "Head atlas")
        height, width = parse_image_size(size, model)
        check_work(model, request)
        with model.lock:
            result = compute_atlas(model.pipe, request.objective, list(request.prompts), list(request.seeds), u=request.u,
                                   scale=request.scale, num_inference_steps=request.num_inference_steps,
                                   guidance_scale=cfg, height=height, width=width, batch_size=ATLAS_BATCH, target=target,
                                   scope=scope, maps_word=maps_word)  # the pipeline's call defaults apply
        result.settings["model"] = model.choice
        png, page, data = write_atlas(result, self.output_dir, slug(request.objective, 24))
        return png, [page, data], summarize(result)

    def load_atlas(self, upload):
        """An atlas JSON written by `dit-attn atlas` (uploaded, never a typed path), drawn as the computed ones."""
        if upload is None:
            raise ValueError("choose an atlas JSON file (OUT.json from `dit-attn atlas`) to upload")
        result = read_atlas(upload)
        png, page, data = write_atlas(result, self.output_dir, "uploaded")
        return png, [page, data], summarize(result)

    def text_edit(self, model_choice, num_inference_steps, guidance_scale, seed, size, prompt, new_text, layers_text, start,
                  blocklist_text, progress=gr.Progress()):
        """The sign prompt and its twin with `new_text` patched into the text layers; with a blocklist also the guarded prompt."""
        if not check_text("sign prompt", prompt).strip():
            raise ValueError('the sign prompt is empty: e.g. a sign that says "A" in red on a white background')
        steps = check_form_steps(num_inference_steps)
        seed = check_form_seed(seed)
        start = number("start", start, 0.0, 1.0)
        cfg = check_form_cfg(guidance_scale)
        new_text = check_text("new text", new_text)
        blocklist = parse_blocklist(check_text("blocklist", blocklist_text))
        progress(0, desc="loading model")
        model = self._image_model(model_choice, "Text edit")
        layers = text_layers(check_text("text layers", layers_text, 1000), model)
        height, width = parse_image_size(size, model)
        total = steps * (3 if blocklist else 2)
        result = run_text_edit(model, prompt.strip(), (new_text or "").strip(), layers, start, seed, steps,
                               call_options(cfg, (height, width) if height else None), blocklist,
                               on_step=lambda done: progress((done, total), desc="denoising", unit="steps"))
        edit = result.edit

        def settings(image: str, *edits) -> dict:
            return {**stored_settings(edit.prompt, model=model.choice, seed=seed, num_inference_steps=steps, guidance_scale=cfg,
                                      height=edit.original.height, width=edit.original.width,
                                      dtype=self.registry.dtype_name, edits=edits), "image": image}

        original = save_png(edit.original, settings("original"), self.output_dir, "original")
        edited = save_png(edit.edited, settings("edited", TextPatch(edit.layers, edit.source_prompt, edit.start)),
                          self.output_dir, "edited")
        note = f"Patched `{edit.source_prompt}` into layers {', '.join(map(str, edit.layers))} from {start:.0%} of the steps."
        guarded = None
        if result.guarded is not None:
            guarded = save_png(result.guarded, settings("guarded", TextGuard(blocklist, REPLACEMENT, edit.layers)),
                               self.output_dir, "guarded")
            note += (" The quoted text has a blocked word: the guarded image patches it with "
                     f"`{REPLACEMENT}`." if result.blocked else " No blocked word in the quotes: the guarded image is the original.")
        return original, edited, guarded, note

    def maps(self, model_choice, prompt, num_inference_steps, guidance_scale, seed, size, heads_text, picked, presets, u,
             scope, target, pag_scale, local_radius, start, end, local_downsample, nag_negative, nag_scale, num_frames, fps,
             kind, words_text, layers_text, capture_heads_text, first_step, last_step, per_layer, progress=gr.Progress()):
        """One generation with the edits on the left and a Capture of the tab's fields: image, overlays, maps.json
        (a video model: the video and animated overlays)."""
        heads = collect_heads(heads_text, picked, presets)
        steps = check_form_steps(num_inference_steps)
        capture = maps_capture(check_text("prompt", prompt).strip(), steps, kind, words_text, layers_text,
                               capture_heads_text, first_step, last_step)
        if not isinstance(per_layer, bool):
            raise ValueError(f"one overlay per layer must be true or false, got {_shown(per_layer)}")
        progress(0, desc="loading model")
        model = self.registry.get(model_choice)
        check_overlays(capture, model, per_layer)
        settings = build_settings(model, prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                                  size=size, heads=heads, pag_scale=pag_scale, u=u, scope=scope, target=target,
                                  local_radius=local_radius, start=start, end=end, local_downsample=local_downsample,
                                  nag_negative=nag_negative, nag_scale=nag_scale, dtype=self.registry.dtype_name,
                                  num_frames=num_frames, fps=fps)
        image, result = run_captured(model, settings, capture,
                                     on_step=lambda done: progress((done, steps), desc="denoising", unit="steps"))
        image_path, gallery, index = write_maps(image, result, self._drawn(model, settings, image), capture,
                                                self.output_dir, per_layer,
                                                getattr(model.pipe, "vae_scale_factor_temporal", 1))
        return image_path, gallery, index

    def model_changed(self, model_choice):
        model = self.registry.get(model_choice)
        return (gr.update(choices=model.head_choices(), value=[]),
                gr.update(choices=model.presets(), value=[], info=_presets_info(model)),
                model.summary(), ",".join(map(str, model.text_layers())))


def _image(label: str, elem_id: str) -> gr.Image:
    return gr.Image(label=label, type="filepath", format="png", interactive=False, buttons=["download", "fullscreen"],
                    height=256, elem_id=elem_id, elem_classes=["dit-attn-image"])


def build_blocks(registry: ModelRegistry, output_dir: str) -> gr.Blocks:
    actions = AppActions(registry, output_dir)
    first = registry.get(registry.default)
    with gr.Blocks(title="dit-attn", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("# dit-attn\nHead-level perturbation guidance on diffusion transformers, in your browser.")
        with gr.Row():
            model_choice = Dropdown(registry.choices, value=registry.default, label="Model", scale=1,
                                    info="embedded models and the directories allowed at launch (--model-dir)")
            model_summary = gr.Markdown(first.summary())
        with gr.Row():
            with gr.Column(scale=1):
                prompt = Textbox(label="Prompt", lines=2, placeholder="a red circle on a white background", elem_id="prompt")
                with gr.Row():
                    steps = Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="steps")
                    cfg = Number(value=4.5, minimum=0, label="CFG scale")
                with gr.Row():
                    seed = Number(value=0, precision=0, minimum=0, label="Seed")
                    size = Textbox(label="Size", placeholder="model default", info="N or WIDTHxHEIGHT", elem_id="size")
                with gr.Row():
                    num_frames = Number(value=None, precision=0, minimum=0, label="Frames", elem_id="frames",
                                        info="video models only: 4k + 1 on Wan (e.g. 9, 17); 0 or empty = the model's default")
                    fps = Number(value=None, minimum=0, label="FPS", elem_id="fps",
                                 info=f"video models only: the video's frame rate; 0 or empty = {DEFAULT_FPS:g}")
                with gr.Accordion("Head guidance", open=True):
                    heads_text = Textbox(label="Heads", placeholder="e.g. L1H0, L2", elem_id="heads",
                                         info="L<layer>H<head>, or L<layer> for all heads of a layer (two experts: "
                                              "E1:L3H2 / E2:L3 for one expert's); empty = no guidance")
                    with gr.Accordion("Layers × heads picker", open=False):
                        picked = CheckboxGroup(first.head_choices(), label="Heads (layer, head)", elem_id="head-picker")
                    presets = Dropdown(first.presets(), value=[], multiselect=True, label="Presets", info=_presets_info(first))
                    pag_scale = Slider(0, 20, value=3.0, step=0.1, label="Guidance scale s")
                    u = Slider(0, 1, value=1.0, step=0.05, label="u (perturbation strength)")
                    with gr.Row():
                        scope = Radio(["joint", "image"], value="joint", label="Scope")
                        target = Radio(["identity", "uniform"], value="identity", label="Target")
                    with gr.Row():
                        guidance_start = Slider(0, 1, value=0.0, step=0.05, label="Guidance start", elem_id="guidance-start",
                                                info="fraction of the steps where head guidance begins")
                        guidance_end = Slider(0, 1, value=1.0, step=0.05, label="Guidance end", elem_id="guidance-end",
                                              info="... and where it stops (steps before start / from end on are stock)")
                with gr.Row():
                    local_radius = Number(value=None, label="Local attention radius (tokens)", elem_id="local-radius",
                                          info="CLEAR: image tokens attend within this radius and to all text; 0 or empty = full attention")
                    local_downsample = Number(value=None, precision=0, label="Local downsample", elem_id="local-downsample",
                                              info="also attend to f×f average-pooled keys (factor f >= 2; empty = off)")
                with gr.Row():
                    nag_negative = Textbox(label="NAG negative prompt", elem_id="nag-negative",
                                           info="Normalized Attention Guidance away from this text (works with CFG off); "
                                                "empty = off")
                    nag_scale = Slider(1, 10, value=5.0, step=0.5, label="NAG scale", elem_id="nag-scale")
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                        image = _image("Image", "generate-image")
                        settings_view = gr.JSON(label="Settings (also inside the PNG; a video: in its .json sidecar)")
                    with gr.Tab("Compare", id="compare"):
                        gr.Markdown("Same seed and settings, without and with the edits (head guidance, local attention), "
                                    "and their difference (a video model: both videos and their difference, animated).")
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
                            set_layout = Textbox(value="1x2", label="Layout", info="ROWSxCOLS", elem_id="set-layout")
                            set_task = Textbox(value="SET", label="Task tag", elem_id="set-task")
                            set_summary = Textbox(label="Summary", placeholder="two panels of the same circle",
                                                  elem_id="set-summary")
                        set_panels = Textbox(label="Panel captions (one a line, row by row)", lines=3,
                                             elem_id="set-panels")
                        with gr.Row():
                            set_reference = ReferenceImage(label="Reference panel (optional)", type="filepath",
                                                           image_mode=None, sources=["upload"], height=160,
                                                           elem_id="set-reference")
                            set_reference_panel = Number(value=0, precision=0, minimum=0, label="Reference panel index",
                                                         info="0-based, row by row")
                        sets_button = gr.Button("Generate set", variant="primary", elem_id="sets-button")
                        set_canvas = _image("Canvas", "set-canvas")
                        set_gallery = gr.Gallery(label="Panels", columns=4, height=200, elem_id="set-panels-gallery")
                        set_caption_view = gr.Textbox(label="Caption used", interactive=False)
                    with gr.Tab("Head atlas", id="atlas"):
                        gr.Markdown("Each head perturbed alone by head guidance vs no guidance: the change of the objective "
                                    "(red up, blue down) with a thumbnail per head (`da.atlas`). Uses the model, CFG, size, "
                                    f"scope and target on the left. At most {MAX_PROMPTS} prompts, {MAX_SEEDS} seeds, "
                                    f"{MAX_ATLAS_STEPS} steps and {MAX_ATLAS_WORK} image-steps ((heads + 1) × prompts × "
                                    "seeds × steps); larger atlases: `dit-attn atlas`.")
                        with gr.Row():
                            atlas_objective = Dropdown(objective_choices(), value="judge", label="Objective",
                                                       elem_id="atlas-objective",
                                                       info="judge: the tiny world's prompt adherence; color: share of "
                                                            "pixels near the colour")
                            atlas_seeds = Textbox(value="0", label="Seeds", info="e.g. 0 1", elem_id="atlas-seeds")
                        atlas_prompts = Textbox(value="a red circle on a white background", lines=3,
                                                label=f"Prompts (one a line, at most {MAX_PROMPTS})", elem_id="atlas-prompts")
                        with gr.Row():
                            atlas_steps = Slider(1, MAX_ATLAS_STEPS, value=8, step=1, label="Steps", elem_id="atlas-steps")
                            atlas_u = Slider(0, 1, value=1.0, step=0.05, label="u")
                            atlas_scale = Slider(0, 20, value=3.0, step=0.1, label="Guidance scale s")
                        atlas_maps_word = Textbox(label="Maps word (optional)", placeholder="e.g. circle",
                                                  elem_id="atlas-maps-word",
                                                  info="a word of the first prompt: each head's cross-attention map "
                                                       "of it on the unguided image, beside its change")
                        atlas_button = gr.Button("Compute atlas", variant="primary", elem_id="atlas-button")
                        atlas_image = gr.Image(label="Atlas (layers × heads)", type="filepath", format="png", interactive=False,
                                               buttons=["download", "fullscreen"], elem_id="atlas-image")
                        atlas_summary = gr.Markdown(elem_id="atlas-summary")
                        atlas_files = gr.File(label="Atlas page (HTML, self-contained) and data (JSON)", file_count="multiple",
                                              interactive=False, elem_id="atlas-files")
                        with gr.Accordion("Show an atlas made by `dit-attn atlas`", open=False):
                            atlas_upload = File(label="OUT.json", file_types=[".json"], type="filepath",
                                                elem_id="atlas-upload")
                            atlas_load_button = gr.Button("Show uploaded atlas", elem_id="atlas-load-button")
                    with gr.Tab("Text edit", id="text-edit"):
                        gr.Markdown("Generate a sign and its twin whose quoted text comes from the new text, patched "
                                    "into the layers that draw text only (`da.edit_text`, same seed). A blocklist also "
                                    "generates the prompt under `da.TextGuard`. Uses the model, steps, CFG, seed and "
                                    "size on the left.")
                        text_prompt = Textbox(value=DEFAULT_SIGN_PROMPT, label="Sign prompt (with quoted text)",
                                              elem_id="text-prompt")
                        with gr.Row():
                            text_new = Textbox(value="B", label="New text", elem_id="text-new")
                            text_layers_box = Textbox(value=",".join(map(str, first.text_layers())), label="Text layers",
                                                      placeholder="e.g. 2 or 2,3", elem_id="text-layers",
                                                      info="from `dit-attn localize`; empty = the model's known ones")
                            text_start = Slider(0, 0.95, value=0.0, step=0.05, label="Start",
                                                info="patch from this fraction of the steps on")
                        text_blocklist = Textbox(label="Blocklist (optional)", placeholder="e.g. A, X",
                                                 info=f"quoted words to patch with {REPLACEMENT} (TextGuard)",
                                                 elem_id="text-blocklist")
                        text_button = gr.Button("Edit text", variant="primary", elem_id="text-button")
                        with gr.Row():
                            text_original = _image("Original", "text-original")
                            text_edited = _image("Edited", "text-edited")
                            text_guarded = _image("Guarded (blocklist)", "text-guarded")
                        text_note = gr.Markdown(elem_id="text-note")
                    with gr.Tab("Maps", id="maps"):
                        gr.Markdown("Where the image attends: one generation with the model, prompt, steps, CFG, seed, "
                                    "size and edits on the left, its attention maps captured in the same call "
                                    "(`da.Capture`) and drawn over the image (heads averaged; a video model: over "
                                    "every frame, animated).")
                        with gr.Row():
                            maps_kind = Radio(["cross", "self", "concept"], value="cross", label="Kind", elem_id="maps-kind",
                                              info="cross: the image's attention on words; self: chosen cells' "
                                                   "attention over the image; concept: ConceptAttention of any words")
                            maps_words = Textbox(label="Words", placeholder="e.g. red, circle (empty: every word)",
                                                 elem_id="maps-words",
                                                 info="comma list; kind self: row,col cells (a video: "
                                                      "frame,row,col) separated by ';'")
                        with gr.Row():
                            maps_layers = Textbox(label="Layers", placeholder="e.g. 0,2 (empty: every layer)",
                                                  elem_id="maps-layers")
                            maps_heads = Textbox(label="Heads", placeholder="e.g. 0,1 (empty: every head)",
                                                 elem_id="maps-heads")
                            maps_first = Number(value=None, precision=0, minimum=0, label="First step",
                                                elem_id="maps-first", info="empty: the first")
                            maps_last = Number(value=None, precision=0, minimum=0, label="Last step",
                                               elem_id="maps-last", info="empty: the last")
                        maps_per_layer = Checkbox(value=True, label="One overlay per layer (else the mean of the layers)",
                                                     elem_id="maps-per-layer")
                        maps_button = gr.Button("Generate with maps", variant="primary", elem_id="maps-button")
                        with gr.Row():
                            maps_image = _image("Image", "maps-image")
                            maps_gallery = gr.Gallery(label="Maps", columns=4, height=320, elem_id="maps-gallery")
                        maps_file = gr.File(label="maps.json (settings and every overlay's values)", interactive=False,
                                            elem_id="maps-file")

        inputs = [model_choice, prompt, steps, cfg, seed, size, heads_text, picked, presets, u, scope, target, pag_scale,
                  local_radius, guidance_start, guidance_end, local_downsample, nag_negative, nag_scale, num_frames, fps]
        generate_button.click(readable_errors(actions.generate), inputs, [image, settings_view], api_name="generate")
        compare_button.click(readable_errors(actions.compare), inputs, [without, with_edit, difference, difference_note],
                             api_name="compare")
        sets_button.click(readable_errors(actions.sets), [model_choice, steps, cfg, seed, size, set_layout, set_panels, set_task,
                                                          set_summary, set_reference, set_reference_panel],
                          [set_canvas, set_gallery, set_caption_view], api_name="sets")
        atlas_outputs = [atlas_image, atlas_files, atlas_summary]
        atlas_button.click(readable_errors(actions.atlas), [model_choice, atlas_objective, atlas_prompts, atlas_seeds,
                                                            atlas_steps, atlas_u, atlas_scale, cfg, size, scope, target,
                                                            atlas_maps_word],
                           atlas_outputs, api_name="atlas")
        atlas_load_button.click(readable_errors(actions.load_atlas), [atlas_upload], atlas_outputs, api_name="load_atlas")
        text_button.click(readable_errors(actions.text_edit), [model_choice, steps, cfg, seed, size, text_prompt, text_new,
                                                               text_layers_box, text_start, text_blocklist],
                          [text_original, text_edited, text_guarded, text_note], api_name="text_edit")
        maps_button.click(readable_errors(actions.maps), inputs + [maps_kind, maps_words, maps_layers, maps_heads, maps_first,
                                                               maps_last, maps_per_layer],
                          [maps_image, maps_gallery, maps_file], api_name="maps")
        model_choice.change(readable_errors(actions.model_changed), [model_choice],
                            [picked, presets, model_summary, text_layers_box], api_visibility="private")
    return blocks
