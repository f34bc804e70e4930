"""Writes the three colabs from one story: `python colabs/make_notebooks.py`.

The notebooks differ only in the framework they import (and TF2's SavedModel export), so they
are generated from this file and committed; a test checks the committed ones are up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
TITLES = {"pytorch": "PyTorch", "jax": "JAX", "tf2": "TensorFlow 2"}

INTRO = """# Big Transfer (BiT) in {title}

BiT models are ResNet-v2s with Group Normalization and Weight Standardization, pre-trained on
ImageNet-21k (BiT-M) or ILSVRC-2012 (BiT-S). Their representations transfer so well that a
handful of labelled examples per class is enough to fine-tune them to a new task, with one fixed
recipe, BiT-HyperRule, choosing resolution, schedule and mixup from the dataset alone.

This notebook loads a released checkpoint, predicts out of the box, extracts embeddings,
fine-tunes few-shot with the hyper-rule, looks at the predictions and the loss curve, and saves
and reloads the result. It runs offline: with `BiT-M-R50x1.npz` in `weights/` it uses the real
model, otherwise a random checkpoint in the released layout (and says so).
`BIT_COLAB_SMALL=1` (the default) keeps every step small enough for a laptop CPU."""

SETUP = """import json, os, subprocess, sys, time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path.cwd().parent if Path.cwd().name == "colabs" else Path.cwd()
sys.path.insert(0, str(ROOT))
from bit_common import checkpoint, registry, runtime
runtime.configure("{fw}")  # the command line's process-wide settings, before {title} starts
from bit_{fw} import models
from bit_common.datasets import load_digits

SMALL = os.environ.get("BIT_COLAB_SMALL", "1") == "1"
MODEL = "BiT-M-R50x1"
WEIGHTS = ROOT / "weights"
WORK = Path(os.environ.get("BIT_COLAB_WORKDIR", ROOT / "runs" / "colab_{fw}"))
SIZE = 32 if SMALL else 128          # crop size; the hyper-rule would pick 128 for 8x8 digits
STEPS = 20 if SMALL else 300
SHOTS = 5"""

WEIGHTS = """path = WEIGHTS / registry.get_model(MODEL).filename
if path.is_file():
    print("Using the released weights", path)
    REAL = True
else:
    REAL = False
    WEIGHTS = WORK / "random_weights"
    path = WEIGHTS / registry.get_model(MODEL).filename
    if not path.is_file():
        checkpoint.write_random_checkpoint(path, registry.get_model(MODEL).arch, 21843 if not SMALL else 100)
    print("*** No released weights here: using a RANDOM checkpoint in the released layout. ***")
    print("Put", registry.get_model(MODEL).filename, "into", ROOT / "weights", "for the real BiT-M.")"""

PREDICT_MD = """## Predict out of the box

`load_npz` infers the architecture from the file and keeps its own head (21843 ImageNet-21k
classes for BiT-M). Inputs are float32 NHWC images scaled to [-1, 1]."""

PREDICT = """test = load_digits("test")

def to_input(images_uint8, size=SIZE):
    # nearest-neighbour upscaling of the 8x8 digits, then BiT's [-1, 1] scaling
    reps = size // images_uint8.shape[1]
    big = images_uint8.repeat(reps, axis=1).repeat(reps, axis=2)
    return (big.astype(np.float32) / 127.5 - 1.0)

x = to_input(test.images[:10])
t0 = time.time()
upstream = models.load_npz(path)
logits = models.predict(upstream, x)
print(f"logits {{logits.shape}} in {{time.time() - t0:.1f}} s; top-5 upstream classes of the first image:",
      np.argsort(-logits[0])[:5])"""

EMBED_MD = """## Embeddings

The pre-logits (2048 channels for R50x1) are a strong generic representation: a nearest-neighbour
classifier on them already works from a few examples."""

EMBED = """train = load_digits("train")
support = np.concatenate([np.flatnonzero(train.labels == c)[:SHOTS] for c in range(10)])
f_support = models.embed(upstream, to_input(train.images[support]))
f_test = models.embed(upstream, to_input(test.images[:50]))
def normed(f):
    return f / np.linalg.norm(f, axis=1, keepdims=True)
nearest = np.argmax(normed(f_test) @ normed(f_support).T, axis=1)
knn = (train.labels[support][nearest] == test.labels[:50]).mean()
print(f"embeddings {{f_support.shape}}; 1-NN accuracy from {{SHOTS}} examples per class: {{knn:.0%}}")"""

FINETUNE_MD = """## Few-shot fine-tuning with BiT-HyperRule

The same command works in every framework (`python -m bit_pytorch.train`, `bit_jax.train`,
`bit_tf2.train`): a new zero-initialised head, SGD with momentum, the rule's warm-up and decays,
{shots} examples per class chosen by `--examples_per_class_seed`."""

FINETUNE = """run = "fewshot"
cmd = [sys.executable, "-m", "bit_{fw}.train", "--name", run, "--model", MODEL,
       "--logdir", str(WORK), "--bit_pretrained_dir", str(WEIGHTS), "--dataset", "digits",
       "--examples_per_class", str(SHOTS), "--batch", "10", "--steps", str(STEPS),
       "--resolution", str(SIZE + SIZE // 4), str(SIZE),
       "--batch_eval", "120", "--workers", "1"] + ([] if REAL else ["--base_lr", "0.03"])
print(" ".join(cmd[2:]))
out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
print(out.stdout[-1500:])
assert out.returncode == 0, out.stderr[-3000:]"""

PLOT_MD = """## Loss curve and predictions"""

PLOT = """records = [json.loads(l) for l in (WORK / run / "metrics.jsonl").read_text().splitlines()]
train_rec = [r for r in records if r["type"] == "train"]
evals = [r for r in records if r["type"] == "eval"]
print("final top-1 on the digits test split:", f"{{evals[-1]['top1']:.1%}}")

fine = models.load_npz(WORK / run / "model.npz")
shown = test.images[:10]
pred = models.predict(fine, to_input(shown)).argmax(1)

fig, axes = plt.subplots(1, 11, figsize=(16, 2))
axes[0].plot([r["step"] for r in train_rec], [r["loss"] for r in train_rec])
axes[0].set_title("training loss"); axes[0].set_xlabel("step")
for ax, img, p, y in zip(axes[1:], shown, pred, test.labels[:10]):
    ax.imshow(img); ax.axis("off")
    ax.set_title(f"{{p}}", color="green" if p == y else "red")
fig.tight_layout()
fig.savefig(WORK / "predictions.png")"""

SAVE_MD = """## Save for later use

`save_npz` writes the released layout, which every framework of this project (and timm) loads."""

SAVE = """models.save_npz(fine, WORK / "mine.npz")
again = models.load_npz(WORK / "mine.npz")
same = np.abs(models.predict(again, to_input(shown)) - models.predict(fine, to_input(shown))).max()
print("reloaded, max |logit difference|:", same)
assert same == 0.0"""

EXPORT_TF2 = """# A SavedModel serves without this package: plain TensorFlow reloads it.
import tensorflow as tf
models.export(fine, str(WORK / "saved_model"))
served = tf.saved_model.load(str(WORK / "saved_model"))
fn = served.signatures["serving_default"]
out = list(fn(tf.constant(to_input(shown))).values())[0].numpy()
diff = np.abs(out - models.predict(fine, to_input(shown))).max()
print("SavedModel reloaded, max |logit difference|:", diff)
assert diff < 1e-4"""


def notebook(fw: str) -> nbformat.NotebookNode:
    f = dict(fw=fw, title=TITLES[fw], shots=5)
    cells = [new_markdown_cell(INTRO.format(**f)), new_code_cell(SETUP.format(**f)),
             new_code_cell(WEIGHTS), new_markdown_cell(PREDICT_MD),
             new_code_cell(PREDICT.format(**f)), new_markdown_cell(EMBED_MD),
             new_code_cell(EMBED.format(**f)), new_markdown_cell(FINETUNE_MD.format(**f)),
             new_code_cell(FINETUNE.format(**f)), new_markdown_cell(PLOT_MD),
             new_code_cell(PLOT.format(**f)), new_markdown_cell(SAVE_MD), new_code_cell(SAVE)]
    if fw == "tf2":
        cells.append(new_code_cell(EXPORT_TF2))
    for i, cell in enumerate(cells):
        cell.id = f"{fw}-{i:02d}"  # stable ids: regenerating gives the same file
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def path_of(fw: str) -> Path:
    return HERE / f"big_transfer_{fw}.ipynb"


def main() -> int:
    for fw in TITLES:
        nbformat.write(notebook(fw), path_of(fw))
        print("wrote", path_of(fw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
