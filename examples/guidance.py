"""Head-level perturbation guidance on the embedded tiny model: the same seed without and with
guidance away from a few heads, saved side by side.

    python examples/guidance.py

On a GPU with SD3.5 or FLUX.1, change the marked lines:
    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium",
                                                    dtype=torch.bfloat16).to("cuda")
    heads = ["L1H10", "L11H15"]          # or a preset: "sd3:dark"; FLUX: "flux:glossy"
and drop `**da.call_defaults(pipe)` (it only shortens the tiny model's zero T5 padding).
"""
import torch
from PIL import Image

import dit_attn as da

pipe = da.load_pipeline("tiny")                      # <- your pipeline
heads = ["L2", "L3H1"]                               # <- heads of your model
prompt = "a large red circle on a white background"

def generate():
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **da.call_defaults(pipe)).images[0]

plain = generate()
with da.apply(pipe, da.HeadGuidance(heads=heads, scale=3.0, u=1.0)):
    guided = generate()
side_by_side = Image.new("RGB", (plain.width * 2, plain.height))
side_by_side.paste(plain, (0, 0))
side_by_side.paste(guided, (plain.width, 0))
side_by_side.save("guidance.png")
print("wrote guidance.png (left: stock, right: head guidance on", ", ".join(heads) + ")")
