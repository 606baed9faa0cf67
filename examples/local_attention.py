"""CLEAR local attention on the tiny model at twice its native size (128×128, a 16×16 token
grid): full attention vs a radius of 4 tokens, then the high-resolution workflow.

    python examples/local_attention.py

On a GPU with FLUX.1 (where local attention pays off at 2K and above), change the marked
lines, e.g. pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", ...), size
2048, radius 16 (tokens), and use weights distilled for that radius
(`dit-attn distill-clear --model ... --radius 16`).
"""
import torch

import dit_attn as da
from dit_attn.workflows.highres import generate_highres

pipe = da.load_pipeline("tiny")                      # <- your pipeline
size, radius = 128, 4                                # <- e.g. 2048, 16 for FLUX.1
prompt = "a small blue triangle top on a yellow background"
settings = dict(height=size, width=size, generator=torch.Generator().manual_seed(0), **da.call_defaults(pipe))

pipe(prompt, **settings).images[0].save("full_attention.png")
with da.apply(pipe, da.LocalAttention(radius)):      # add weights="clear.safetensors" after distillation
    pipe(prompt, **{**settings, "generator": torch.Generator().manual_seed(0)}).images[0].save("local_attention.png")

result = generate_highres(pipe, prompt, size, size, radius=radius, base_height=64, base_width=64,
                          **da.call_defaults(pipe))
result.image.save("highres.png")
print("wrote full_attention.png, local_attention.png, highres.png")
