"""A notebook's tour of clearmaps, as a script: each figure is one call.

    python scripts/notebook_tour.py [OUT]          # default OUT: clearmaps-tour/

Run it cell by cell in Jupyter (each ``# %%`` is a cell; there the figures show themselves), or as a script,
which saves every figure under OUT. Needs matplotlib (``pip install "clearmaps[plot]"``). The first call of
the CPU backend on a machine compiles its kernels (about a minute on 2 cores, said on the ``clearmaps``
logger); later runs start at once.

Every figure is drawn from the built-in MNIST model and its held-out digits, except the last, which brings a
model of one's own through a JSON architecture.
"""

# %% the model, a few held-out digits, their CLEAR maps
import logging
import sys
from pathlib import Path

import numpy as np

import clearmaps
from clearmaps import builtin

logging.basicConfig(format="%(name)s: %(message)s")  # the first-run notice, in a script too
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "clearmaps-tour")
OUT.mkdir(parents=True, exist_ok=True)

net = builtin.load_model()                      # or clearmaps.from_torch(builtin.torch_model())
images, labels = builtin.heldout()
pick = [518, 574, 983]                          # a 5, a 5 read as a 3, a 9 read as a 7
x = builtin.to_input(images[pick])              # float (3, 1, 28, 28), white digits on black
e = clearmaps.explain(net, x, method="guided")  # the Explanation keeps a reference to x, for pictures
print(repr(e))                                  # a few lines, not the arrays

# %% one figure: input, CLEAR map with its legend, overlay, heatmap (and the binary map)
fig = e.plot(1, true=int(labels[pick[1]]), binary=True)
for suffix in ("png", "pdf", "svg"):            # a plain matplotlib Figure: save it in any format
    fig.savefig(OUT / f"plot-misclassified-5.{suffix}", dpi=120)

# %% the same picture without matplotlib: what the clearmaps command writes as panel.png
e.panel(1, true=int(labels[pick[1]])).save(OUT / "panel-misclassified-5.png")

# %% colours fixed by class: each image's top 3 classes, class 7 in class 7's hue whatever its rank
top3 = clearmaps.explain(net, x, classes="top3", method="guided")
top3.plot(2, true=int(labels[pick[2]])).savefig(OUT / "plot-top3.png", dpi=120)

# %% a palette colour-blind readers can tell apart (at most 10 classes)
blind = clearmaps.explain(net, x, method="guided", palette="colorblind")
blind.plot(0, true=int(labels[pick[0]])).savefig(OUT / "plot-colorblind.png", dpi=120)

# %% the overlay on the user's own image, at its own resolution: a digit photographed at 200 x 200
from PIL import Image  # noqa: E402

photo = Image.fromarray(255 - images[574]).resize((200, 200), Image.Resampling.BILINEAR)  # dark ink on paper
digit = builtin.to_input(255 - np.asarray(photo.resize((28, 28), Image.Resampling.BILINEAR))[None])  # inverted
clearmaps.explain(net, digit, method="guided").plot(0, image=photo, true=5).savefig(OUT / "plot-photo.png", dpi=120)

# %% the paper's Fig. 3 in one call
from clearmaps import paper  # noqa: E402

fig3, _ = paper.figure3(net, images[:, None] / 255.0, labels, method="guided")
fig3.save(OUT / "figure3.png")

# %% a model of one's own: its architecture as JSON, its weights as a state dict
import json  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

ARCH = {
    "input_shape": [3, 64, 64],
    "class_names": ["cat", "dog", "bird"],
    "layers": [
        {"type": "conv", "name": "features.0", "in": 3, "out": 16, "kernel": 3, "padding": 1},
        {"type": "batchnorm", "name": "features.1", "channels": 16},
        {"type": "relu"},
        {"type": "maxpool", "kernel": 2},
        {"type": "conv", "name": "features.4", "in": 16, "out": 32, "kernel": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv", "name": "head", "in": 32, "out": 3, "kernel": 1},
        {"type": "gap"},
    ],
}


class MyNet(nn.Module):  # the module the spec describes: the same state-dict keys
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, x):
        return self.head(self.features(x)).mean(dim=(2, 3))


torch.manual_seed(0)
torch.save(MyNet().eval().state_dict(), OUT / "mynet.pt")  # weights only: never torch.save(model)
(OUT / "mynet.json").write_text(json.dumps(ARCH, indent=1))
own = clearmaps.load_checkpoint(OUT / "mynet.pt", arch=OUT / "mynet.json")
yy, xx = np.mgrid[0:64, 0:64] / 63.0
disc = ((yy - 0.5) ** 2 + (xx - 0.4) ** 2 < 0.08).astype(np.float32)
pictures = np.stack([disc, 0.3 + 0.4 * xx, 0.6 * yy]).astype(np.float32)[None]  # a red disc on a gradient
clearmaps.explain(own, pictures).plot(0).savefig(OUT / "plot-own-model.png", dpi=120)

print(f"wrote {', '.join(sorted(p.name for p in OUT.iterdir()))} in {OUT}/")
