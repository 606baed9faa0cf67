"""Text editing on the embedded tiny model: a sign and its twin whose quoted text comes from a
new prompt through the text layers only (same starting noise), then the sign under a blocklist.

    python examples/text_edit.py            (CPU, a few seconds; writes text_edit*.png here)

The layers are those `dit-attn localize --signs 20` ranks first; on the tiny model L3, then L0.
On a GPU with SD3.5 or FLUX.1, change the marked lines:
    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium",
                                                    dtype=torch.bfloat16).to("cuda")
    layers = [...]                       # your model's text layers, from `dit-attn localize --model ...`
    prompt = 'a storefront sign that says "OPEN"'; new_text = "CLOSED"; num_inference_steps = 28
(FLUX.1: FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", ...); its single blocks count
from 19, so text layers there are numbers like 19 + j.)
"""
import torch

import dit_attn as da
from dit_attn.localization.score import judge_glyph_probability

torch.set_num_threads(1)

pipe = da.load_pipeline("tiny")                      # <- your pipeline
pipe.set_progress_bar_config(disable=True)
layers = [0, 3]                                      # <- your model's text layers
prompt = 'a sign that says "A" in red on a white background'
new_text = "B"
num_inference_steps = 20                             # <- 28 for SD3.5, 20-28 for FLUX.1

# The original and its edited twin: "B" patched into the text keys/values of `layers` from step 0,
# both from the generator's starting state.
edit = da.edit_text(pipe, prompt, new_text, layers=layers, start=0.0, generator=torch.Generator().manual_seed(0),
                    num_inference_steps=num_inference_steps)
edit.side_by_side.save("text_edit.png")
# The tiny world's judge reads one character (drop these lines on a real model, or use an OCR score).
p_new = judge_glyph_probability([edit.original, edit.edited], [new_text, new_text]).tolist()
print(f"wrote text_edit.png: left {prompt!r}, right {edit.source_prompt!r} through layers {list(edit.layers)}; "
      f"judge's probability of {new_text!r}: {p_new[0]:.2f} -> {p_new[1]:.2f}; "
      f"{edit.seconds_edited:.2f}s edited vs {edit.seconds_original:.2f}s original")

# A blocklist: quoted words on it are patched with "****" in the same layers; other prompts run stock.
with da.apply(pipe, da.TextGuard(["A"], layers=layers)):
    guarded = pipe(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=num_inference_steps,
                   **da.call_defaults(pipe)).images[0]
guarded.save("text_edit_guarded.png")
print("wrote text_edit_guarded.png: the same sign with \"A\" blocked")
