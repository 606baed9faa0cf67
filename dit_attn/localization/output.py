"""The localization bar chart (drawn with Pillow)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def bar_chart(labels: list[str], values: list[float], title: str, highlight: int | None = None) -> Image.Image:
    """A vertical bar chart: one bar per label, the `highlight` bar in orange."""
    font = ImageFont.load_default()
    bar, gap, left, right, top, bottom = 26, 8, 56, 16, 48, 40
    width = max(420, left + right + len(values) * (bar + gap))
    height = 300
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black", font=font)
    low = min(0.0, min(values))
    high = max(max(values), low + 1e-9)
    plot_h = height - top - bottom

    def y_of(v: float) -> float:
        return top + plot_h * (high - v) / (high - low)

    for k in range(5):  # y ticks
        v = low + (high - low) * k / 4
        y = y_of(v)
        draw.line([(left - 4, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{v:.3g}", fill="black", font=font)
    draw.line([(left, top), (left, height - bottom)], fill="black")
    for i, (label, v) in enumerate(zip(labels, values)):
        x0 = left + gap + i * (bar + gap)
        colour = (235, 130, 30) if i == highlight else (60, 110, 200)
        y0, y1 = sorted((y_of(v), y_of(0.0)))
        draw.rectangle([x0, y0, x0 + bar, max(y1, y0 + 1)], fill=colour)
        draw.text((x0, height - bottom + 6), label, fill="black", font=font)
        draw.text((x0, y0 - 12), f"{v:.2f}", fill="black", font=font)
    return image
