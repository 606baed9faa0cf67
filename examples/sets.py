"""In-context sets on the embedded tiny model: a joint caption, a two-panel canvas, its panels,
then the same set with the left panel given as a reference (overwrite mode).

Run:  python examples/sets.py            (CPU, a few seconds; writes sets-*.png here)
For a trained set LoRA first:  dit-attn train-lora --mode ic --make-sets 64 --data sets/ --work w/ --out ic-lora/
"""
import torch

import dit_attn as da
from dit_attn.toy import data

torch.set_num_threads(1)

pipe = da.load_pipeline("tiny")  # FLUX.1 on a GPU: FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
#                                    dtype=torch.bfloat16).to("cuda"); SD3.5: StableDiffusion3Pipeline(...)
pipe.set_progress_bar_config(disable=True)
# pipe.load_lora_weights("ic-lora/")  # an IC-LoRA from `dit-attn train-lora --mode ic` (or a kohya / ai-toolkit FLUX LoRA)

# One caption for the set: [TASK] summary; [LEFT] panel 1; [RIGHT] panel 2 (the tiny world's set format).
text = da.ic.caption(["a red circle on a white background", "a blue circle on a white background"], "1x2",
                     task_tag="SET", summary="two panels of the same circle")
print(text)

# size is the canvas (height, width): 64x64 panels for the tiny model (FLUX.1: e.g. (1024, 2048));
# steps: 20 here (FLUX.1-dev IC-LoRA recipe: 20 Euler steps, guidance_scale=3.5).
result = da.ic.generate_set(pipe, text, "1x2", size=(64, 128), seed=0, num_inference_steps=20)
result.canvas.save("sets-canvas.png")
for k, panel in enumerate(result.panels):
    panel.save(f"sets-panel-{k}.png")

# Reference-conditioned: keep the left panel (a rendered set's left half here; your own image on a GPU model),
# generate the right one. On a FLUX.1 Fill pipeline use mode="fill" (a mask over the panels to generate).
example = data.make_set_example(seed=7, index=0)
left = da.ic.split(example.image, "1x2")[0]
conditioned = da.ic.generate_set(pipe, example.caption, "1x2", size=(64, 128), reference={0: left}, seed=0,
                                 num_inference_steps=20)
conditioned.canvas.save("sets-reference.png")
print(example.caption)
print(da.ic.set_consistency([result.canvas, conditioned.canvas], [text, example.caption]))  # the tiny world's judge
