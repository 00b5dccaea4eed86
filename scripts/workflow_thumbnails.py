"""Draw the templates browser's thumbnail of each UI workflow: `example_workflows/<name>.jpg` beside `<name>.json`,
the nodes where the workflow places them (titled as in its API twin's `_meta`) and their links.

    python scripts/workflow_thumbnails.py [NAME ...]     # default: every workflow in example_workflows/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
UI_DIR = REPO_ROOT / "example_workflows"
API_DIR = REPO_ROOT / "workflows" / "api"
SIZE = (560, 320)
MARGIN, HEADER = 16, 36
TITLE_HEIGHT = 30
"""LiteGraph draws a node's title bar above its `pos`."""
BACKGROUND, CORE_NODE, PACK_NODE = (24, 24, 28), (58, 58, 62), (78, 62, 128)
OUTLINE, LINK, TEXT = (170, 170, 180), (110, 150, 230), (235, 235, 235)
PACK_PREFIXES = ("IDAdapter", "InvAdapter")


def heading(name: str) -> str:
    """'idadapter_sd15' -> 'IDAdapter SD1.5', 'inv_adapter_two_people_sdxl' -> 'Inv-Adapter two people SDXL'."""
    words = name.replace("inv_adapter", "Inv-Adapter").replace("idadapter", "IDAdapter").split("_")
    bases = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL"}
    return " ".join(bases.get(word, word) for word in words)


def wrap(text: str, font: ImageFont.ImageFont, width: float) -> list[str]:
    """Break `text` into lines no wider than `width`, at spaces where possible."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    return lines


def draw_thumbnail(name: str) -> Image.Image:
    ui = json.loads((UI_DIR / f"{name}.json").read_text())
    api = json.loads((API_DIR / f"{name}.json").read_text())
    boxes = {node["id"]: (node["pos"][0], node["pos"][1] - TITLE_HEIGHT,
                          node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1]) for node in ui["nodes"]}
    left, top = min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values())
    right, bottom = max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())
    scale = min((SIZE[0] - 2 * MARGIN) / (right - left), (SIZE[1] - HEADER - MARGIN) / (bottom - top))

    def at(x: float, y: float) -> tuple[float, float]:
        return MARGIN + (x - left) * scale, HEADER + (y - top) * scale

    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11)
    draw.text((MARGIN, 10), heading(name), fill=TEXT, font=ImageFont.load_default(size=14))
    for _, source, _, target, _, _ in ui["links"]:
        draw.line([at(boxes[source][2], boxes[source][1] + TITLE_HEIGHT / 2),
                   at(boxes[target][0], boxes[target][1] + TITLE_HEIGHT / 2)], fill=LINK, width=1)
    for node in ui["nodes"]:
        x0, y0, x1, y1 = boxes[node["id"]]
        colour = PACK_NODE if node["type"].startswith(PACK_PREFIXES) else CORE_NODE
        draw.rectangle([at(x0, y0), at(x1, y1)], fill=colour, outline=OUTLINE)
        title = node.get("title") or api[str(node["id"])].get("_meta", {}).get("title", node["type"])
        text_x, text_y = at(x0, y0)
        fitting_lines = max(1, int(((y1 - y0) * scale - 4) // 12))
        for index, line in enumerate(wrap(title, font, (x1 - x0) * scale - 6)[:fitting_lines]):
            draw.text((text_x + 3, text_y + 2 + 12 * index), line, fill=TEXT, font=font)
    return image


def main(names: list[str]) -> None:
    for name in names or sorted(path.stem for path in UI_DIR.glob("*.json")):
        path = UI_DIR / f"{name}.jpg"
        draw_thumbnail(name).save(path, quality=90)
        print(f"wrote {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
