"""Head atlas on the embedded tiny model: what each head does to an objective when head guidance
perturbs it alone, as a layers × heads heatmap (PNG) and a self-contained HTML page; then the
head that raises the objective most, used for guidance.

    python examples/atlas.py                (CPU, ~30 s with one thread; writes atlas-red.* here)

Here the objective is `color:red` (share of red pixels). On a GPU with SD3.5 or FLUX.1, change
the marked lines:
    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium",
                                                    dtype=torch.bfloat16).to("cuda")
    objective = "pickscore"              # or "clip-score", "aesthetic:<dir>" (weights available locally)
    prompts = [...]; num_inference_steps = 20  # SD3.5-medium has 24 layers × 24 heads: 577 images a (prompt, seed)
The same with a progress bar, resumable: dit-attn atlas --objective color:red --prompts prompts.txt --out atlas
"""
import torch

import dit_attn as da
from dit_attn.guidance.atlas import render_html, render_png

torch.set_num_threads(1)

pipe = da.load_pipeline("tiny")                      # <- your pipeline
pipe.set_progress_bar_config(disable=True)
objective = "color:red"                              # <- your objective
prompts = ["a circle on a white background", "a large square on a black background"]  # <- your prompts
num_inference_steps = 8                              # <- 20-28 on a real model

picture = da.atlas(pipe, objective, prompts, seeds=[0], u=1.0, scale=3.0, num_inference_steps=num_inference_steps,
                   batch_size=6, **da.call_defaults(pipe), checkpoint="atlas-red.checkpoint.json")  # rerun to resume
render_png(picture, "atlas-red.png")
render_html(picture, "atlas-red.html")
picture.save("atlas-red.json")
ranked = sorted(picture.scores, key=picture.delta, reverse=True)
print(f"baseline {objective} {picture.baseline:.3f}; largest rises:",
      ", ".join(f"{h} {picture.delta(h):+.3f}" for h in ranked[:3]))

best = ranked[0]
with da.apply(pipe, da.HeadGuidance(heads=[best], scale=3.0, u=1.0)):
    image = pipe(prompts[0], generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                 **da.call_defaults(pipe)).images[0]
image.save("atlas-red-guided.png")
print(f"wrote atlas-red.png, atlas-red.html, atlas-red.json and atlas-red-guided.png (guided away from {best})")
