"""Find heads whose guidance raises an objective (HeadHunter), and draw the head atlas.

    python examples/head_search.py

Here the objective is the tiny model's judge (prompt adherence). On a GPU with SD3.5 or
FLUX.1, load that pipeline instead, use a real objective (e.g. "pickscore" with the
weights available locally) and real prompts, and raise `num_inference_steps` to 20-28.
"""
import dit_attn as da
from dit_attn.guidance.atlas import atlas, render_html, render_png
from dit_attn.guidance.search import hunt
from dit_attn.toy.evaluate import held_out_prompts

pipe = da.load_pipeline("tiny")                      # <- your pipeline
pipe.set_progress_bar_config(disable=True)
prompts = held_out_prompts("shape", 4)               # <- your prompts
run = dict(num_inference_steps=10, batch_size=4)   # 1-4 candidates per call suit a CPU

result = hunt(pipe, "judge", prompts, seeds=[0], k=2, rounds=1, checkpoint="hunt.checkpoint.json", **run)
print("selected heads:", result.selected)
result.save("hunt.json")

picture = atlas(pipe, "color:red", prompts, seeds=[0], checkpoint="atlas.checkpoint.json", **run)
render_png(picture, "atlas.png")
render_html(picture, "atlas.html")
print("wrote hunt.json, atlas.png, atlas.html")
