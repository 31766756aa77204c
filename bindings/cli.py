"""The ``clearmaps`` command.

    clearmaps demo [--out DIR]                      the paper's Fig. 3 on the built-in MNIST model
    clearmaps explain [IMAGES ...] [--out DIR]      CLEAR maps, overlays, heatmaps, binary maps, panels
    clearmaps evaluate [--tau T ...] [--out DIR]    the paper's Table 1 (strong features) on a labelled set

Without ``--checkpoint`` the built-in model (ALL-CNN-style, trained on real MNIST digits) is used. Every
mistake in the input ends in one line ``clearmaps: error: ...`` and a non-zero exit status, never a
traceback. Outputs are written atomically; a rerun skips images already done unless ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import builtin, render
from .backends import BACKENDS, get_backend
from .checkpoints import PRESETS, load_checkpoint
from .explain import explain, resolve_classes
from .images import Item, Preprocess, load_images, parse_size
from .reference import (ClearmapsError, Network, binary_map, heatmap, keep_strong, palette_rgb, remove_strong,
                        strong_feature_mask)

PAPER_TABLE1_MNIST = {"full": 99.26, "only_strong": 79.89, "without_strong": 43.45}
# tau = 0.1: an order-of-magnitude cut on r(x|true). On the built-in held-out digits the mask then covers
# 16.2% of the image, the closest of the sweep 0.05/0.1/0.2/0.5 to the digits' ink (13.4% of pixels > 0.5):
# "only strong features" keeps about as many pixels as a digit has. Chosen by that area, not by the
# accuracies (README shows the sweep).
DEFAULT_TAU = 0.1
FILES = ("clear.png", "overlay.png", "heatmap.png", "binary.png", "legend.png", "panel.png", "maps.npz")


def say(*args) -> None:
    print(*args, flush=True)


# ---- the model ----------------------------------------------------------------------------------------

@dataclass
class Model:
    net: Network
    description: str
    fingerprint: str
    builtin: bool


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_class_names(path) -> list[str]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClearmapsError(f"--class-names file {str(p)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClearmapsError(f"--class-names file {str(p)!r} could not be read ({exc}).") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClearmapsError(f"--class-names file {str(p)!r} is not a valid JSON list ({exc}).") from None
        if not isinstance(names, list):
            raise ClearmapsError(f"--class-names file {str(p)!r} must hold a JSON list of names.")
        return [str(n) for n in names]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ClearmapsError(f"--class-names file {str(p)!r} is empty; write one class name per line.")
    return names


def load_model(args) -> Model:
    if args.checkpoint is None:
        if args.arch is not None or args.class_names is not None:
            raise ClearmapsError("--arch and --class-names describe a --checkpoint; give the checkpoint too "
                                 "(without one the built-in MNIST model is used).")
        net = builtin.load_model()
        meta = builtin.info()
        desc = (f"built-in allcnn-mnist, trained on real MNIST digits ({meta['train']} for training, "
                f"held-out accuracy {100 * meta['held_out_accuracy']:.1f}% on {meta['held_out']}); it expects "
                f"{builtin.PREPROCESSING}")
        return Model(net, desc, "builtin:" + _sha256(builtin.WEIGHTS), True)
    path = Path(args.checkpoint)
    names = _read_class_names(args.class_names) if args.class_names else None
    net = load_checkpoint(path, arch=args.arch, class_names=names)
    c, h, w = net.input_shape
    desc = (f"{path} (arch {args.arch or 'from the file'}; {net.num_classes} classes; input {c} channel(s), "
            f"{'any size' if h is None else f'{h}x{w}'})")
    return Model(net, desc, _sha256(path), False)


def preprocess_from(args) -> Preprocess:
    return Preprocess(mode=args.mode, resize=parse_size(args.resize) if args.resize else None,
                      invert=args.invert, mean=args.mean, std=args.std)


def parse_classes(args, net: Network):
    """--classes / --top-k → what :func:`clearmaps.explain` takes, validated before any image is read."""
    if args.classes is not None and args.top_k is not None:
        raise ClearmapsError("give --classes or --top-k, not both.")
    if args.top_k is not None:
        classes = f"top{args.top_k}"
    elif args.classes is not None:
        classes = []
        for token in (t.strip() for t in args.classes.split(",")):
            if not token:
                continue
            # a name wins over an id, so class names that look like numbers mean themselves
            classes.append(token if token in net.class_names or not token.lstrip("-").isdigit() else int(token))
        if not classes:
            raise ClearmapsError("--classes is empty; give ids or names separated by commas, e.g. --classes 3,5,8.")
    else:
        return None
    resolve_classes(classes, net, np.zeros((1, net.num_classes)))
    return classes


def class_id(net: Network, token: str, what: str) -> int:
    token = str(token).strip()
    if token in net.class_names:
        return net.class_names.index(token)
    if token.lstrip("-").isdigit():
        i = int(token)
        if 0 <= i < net.num_classes:
            return i
        raise ClearmapsError(f"{what} {i} is out of range; the network has classes 0 .. {net.num_classes - 1}.")
    raise ClearmapsError(f"{what} {token!r} is not a class name; the network's classes are {list(net.class_names)}.")


def backend_name(name: str) -> str:
    used = get_backend(name).__name__.rsplit(".", 1)[-1]
    return used if name == used else f"{name} -> {used}"


def classify(net: Network, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predicted class ids of ``x`` (B, C, H, W): the network's forward pass run by torch (float32).

    Used to classify many images quickly (the held-out set, the masked images of Table 1); the CLEAR maps
    themselves always come from :func:`clearmaps.explain` with the chosen backend.
    """
    import torch
    import torch.nn.functional as F

    from .reference import Conv, MaxPool, ReLU

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            t = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
            for layer in net.layers:
                if isinstance(layer, Conv):
                    t = F.conv2d(t, torch.from_numpy(np.asarray(layer.weight, dtype=np.float32)),
                                 torch.from_numpy(np.asarray(layer.bias, dtype=np.float32)), layer.stride,
                                 layer.padding)
                elif isinstance(layer, ReLU):
                    t = F.relu(t)
                elif isinstance(layer, MaxPool):
                    t = F.max_pool2d(t, layer.kernel, layer.stride, layer.padding)
            out.append(t.mean(dim=(2, 3)).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64)


# ---- output folders -----------------------------------------------------------------------------------

def prepare_out(path) -> Path:
    """Create the output folder and prove it can be written, before any work is done."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        raise ClearmapsError(f"output folder {str(out)!r} is a file; choose another with --out.") from None
    except OSError as exc:
        raise ClearmapsError(f"cannot write to output folder {str(out)!r} ({exc.strerror or exc}); choose "
                             "another with --out.") from None
    return out


def progress(iterable, total: int, desc: str, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a bare environment should still work
        return iterable
    # disable=None: tqdm draws only on a terminal, so logs and pipes stay clean
    return tqdm(iterable, total=total, desc=desc, unit="img", disable=True if quiet or total < 2 else None,
                file=sys.stderr,
                dynamic_ncols=True, leave=False)


# ---- explain ------------------------------------------------------------------------------------------

def _position(classes_row: np.ndarray, class_id_: int | None) -> int | None:
    hit = np.flatnonzero(classes_row == class_id_) if class_id_ is not None else []
    return int(hit[0]) if len(hit) else None


def write_outputs(folder: Path, item: Item, e, b: int, true: int | None, scale: int, settings: str,
                  binary_threshold: float = 0.1, invert: bool = False) -> dict:
    """Every output of one image (see FILES), each written atomically; maps.npz last, as the 'done' mark."""
    names = e.class_names
    classes_row = e.classes[b]
    pred = int(e.predicted[b])
    prob = float(e.probabilities[b, pred])
    # the heatmap and binary map are drawn against one class: the true one when known and among the maps,
    # else the prediction
    ref = true if _position(classes_row, true) is not None else pred
    pos = _position(classes_row, ref)
    if pos is None:
        ref, pos = int(classes_row[0]), 0
    ref_why = "true class" if ref == true else ("predicted class" if ref == pred else "first class shown")
    resp = e.responses[b:b + 1]
    heat = heatmap(resp, np.array([pos]))[0]
    binary = binary_map(resp, np.array([pos]), threshold=binary_threshold)[0]
    image = render.pixels_to_rgb(1.0 - item.pixels if invert else item.pixels)  # as the model sees it
    clear = e.rgb[b]
    colours = palette_rgb(e.palette)
    legend = render.legend(colours, [names[c] for c in classes_row],
                           highlight=(names[pred],) + ((names[true],) if true is not None else ()))

    folder.mkdir(parents=True, exist_ok=True)
    up = lambda a: render.upscale(a, scale)  # noqa: E731
    render.save_png(folder / "clear.png", up(clear))
    render.save_png(folder / "overlay.png", up(render.overlay(image, clear)))
    render.save_png(folder / "heatmap.png", up(heat))
    render.save_png(folder / "binary.png", up(binary))
    render.save_png(folder / "legend.png", render.pad(legend, 6))
    caption = (f"{item.name}: predicted {names[pred]} (p = {prob:.2f})"
               + (f", true {names[true]}" + (" - correct" if true == pred else " - MISCLASSIFIED")
                  if true is not None else ", true class unknown"))
    key = (f"heatmap: hot = response of class {names[ref]} ({ref_why}), green = another class beats it.  "
           f"binary map: red = for {names[ref]}, blue = against (where the dominant response is above "
           f"{binary_threshold:g} of the image's strongest).")
    tiles = render.hstack([render.titled(up(image), "input"), render.titled(up(clear), "CLEAR map"),
                           render.titled(up(render.overlay(image, clear)), "overlay"),
                           render.titled(up(heat), f"heatmap ({names[ref]})"),
                           render.titled(up(binary), f"binary map ({names[ref]})")], gap=8)
    panel = render.vstack([legend, render.text_block(caption, size=15, align="left", pad=1), tiles,
                           render.text_block(key, size=12, align="left", pad=1, colour=(70, 70, 70))], gap=6)
    render.save_png(folder / "panel.png", render.pad(panel, 10))
    arrays = dict(responses=e.responses[b].astype(np.float32), classes=classes_row,
                  dominant_class=e.dominant_class[b], dominant_response=e.dominant_response[b].astype(np.float32),
                  rgb=clear, logits=e.logits[b], probabilities=e.probabilities[b], palette=e.palette,
                  class_names=np.array(names), input=item.pixels.astype(np.float32),
                  true_class=np.int64(-1 if true is None else true), settings=np.array(settings))
    render.atomic_write(folder / "maps.npz", lambda f: np.savez_compressed(f, **arrays))
    return {"name": item.name, "source": item.source, "predicted": names[pred], "probability": round(prob, 4),
            "true": None if true is None else names[true]}


def is_done(folder: Path, settings: str) -> bool:
    """An image is done when all its files are there and maps.npz was made with the same settings."""
    if not all((folder / f).is_file() for f in FILES):
        return False
    try:
        with np.load(folder / "maps.npz", allow_pickle=False) as data:
            return str(data["settings"]) == settings
    except Exception:  # an unreadable or older file: redo it
        return False


def run_explain_items(items: list[Item], trues: list, model: Model, args, out: Path, classes, options: dict,
                      quiet: bool = False) -> tuple[list, int, int]:
    """Explain ``items`` in batches and write their outputs under ``out``/<name>/. Returns (records, done
    now, skipped)."""
    net = model.net
    todo, skipped, records = [], 0, []
    for item, true in zip(items, trues):
        scale = args.scale or render.auto_scale(*item.pixels.shape[1:])
        settings = json.dumps({"model": model.fingerprint, "source": item.source, "classes": classes,
                               "true": true, "scale": scale, "input": hashlib.sha256(
                                   np.ascontiguousarray(item.pixels, dtype=np.float32).tobytes()).hexdigest(),
                               **options}, sort_keys=True, default=str)
        if not args.force and is_done(out / item.name, settings):
            skipped += 1
            continue
        todo.append((item, true, settings, scale))
    bar = progress(range(len(todo)), len(todo), "explaining", quiet)
    bar_iter = iter(bar)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        by_shape: dict = {}
        for entry in chunk:  # images of one batch must share a size
            by_shape.setdefault(entry[0].pixels.shape, []).append(entry)
        for group in by_shape.values():
            x = options["preprocess"].normalise(np.stack([g[0].pixels for g in group]))
            e = explain(net, x, classes=classes, backend=args.backend, rectify=args.rectify, reduce=args.reduce,
                        vmax=args.vmax)
            for b, (item, true, settings, scale) in enumerate(group):
                records.append(write_outputs(out / item.name, item, e, b, true, scale, settings,
                                             options["binary_threshold"], options["preprocess"].invert))
                next(bar_iter, None)
    if hasattr(bar, "close"):
        bar.close()
    return records, len(todo), skipped


def _vmax(text):
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def cmd_explain(args) -> int:
    t0 = time.perf_counter()
    backend = backend_name(args.backend)  # an unusable backend is refused before any work
    model = load_model(args)
    net = model.net
    classes = parse_classes(args, net)
    pre = preprocess_from(args)
    true_all = class_id(net, args.true_label, "--true-label") if args.true_label is not None else None
    out = prepare_out(args.out)
    c, h, w = net.input_shape
    say(f"model: {model.description}")
    if args.inputs:
        items, notes = load_images(args.inputs, pre, c, (h, w))
        for note in notes:
            say(f"input: {note}")
    else:
        if not model.builtin:
            raise ClearmapsError("no images given; pass image files, folders or .npy/.npz batches "
                                 "(the built-in samples go with the built-in model only).")
        images, labels, index = builtin.samples()
        items = [Item(f"sample-{i:02d}-digit{int(lab)}", f"built-in held-out #{int(j)}",
                      images[i][None].astype(np.float64) / 255.0, int(lab))
                 for i, (lab, j) in enumerate(zip(labels, index))]
        say(f"input: no images given, so the {len(items)} built-in sample digits (held-out, never trained on)")
    say(pre.describe(c, (h, w)))
    for item in items:
        if item.label is not None and not 0 <= item.label < net.num_classes:
            raise ClearmapsError(f"{item.source} has label {item.label}; the network has classes "
                                 f"0 .. {net.num_classes - 1}.")
    trues = [true_all if true_all is not None else item.label for item in items]
    say(f"backend: {backend}; classes: "
        f"{'all ' + str(net.num_classes) if classes is None else classes}; rectify={args.rectify}, "
        f"reduce={args.reduce}, vmax={args.vmax or 'per image max'}")
    if not 0 <= args.binary_threshold < 1:
        raise ClearmapsError(f"--binary-threshold {args.binary_threshold}; expected a fraction in [0, 1).")
    options = {"preprocess": pre, "rectify": args.rectify, "reduce": args.reduce, "vmax": args.vmax,
               "binary_threshold": args.binary_threshold}
    records, done, skipped = run_explain_items(items, trues, model, args, out, classes, options, args.quiet)
    labelled = [r for r in records if r["true"] is not None]
    correct = sum(r["true"] == r["predicted"] for r in labelled)
    for r in records if len(records) <= 40 and not args.quiet else []:
        say(f"  {r['name']}: predicted {r['predicted']} (p = {r['probability']:.2f})"
            + (f", true {r['true']}" if r["true"] is not None else ""))
    say(f"explained {done} image(s)" + (f", skipped {skipped} already done (--force redoes them)" if skipped else "")
        + (f"; {correct}/{len(labelled)} correctly classified" if labelled else "")
        + f"; {time.perf_counter() - t0:.1f} s; outputs in {out}/<image>/ ({', '.join(FILES)})")
    return 0


# ---- demo (Fig. 3) ------------------------------------------------------------------------------------

def figure3(rows: list, colours, names, scale: int, source: str) -> "render.Image.Image":
    """The paper's Fig. 3 layout: per digit, a correctly classified and a misclassified example, each as
    (I) image, (II) heatmap, (III) CLEAR map; the colour legend on top."""
    cell = 28 * scale
    set_width = 3 * cell + 2 * 4

    def example_set(ex, kind):
        if ex is None:
            box = render.placeholder(set_width, cell, f"no {kind} example of this digit\nin the {source}")
            return render.vstack([box, render.text_block("", set_width, 12)], gap=2)
        cells = render.hstack([render.upscale(ex["image"], scale), render.upscale(ex["heatmap"], scale),
                               render.upscale(ex["clear"], scale)], gap=4)
        caption = (f"#{ex['index']}: predicted {names[ex['pred']]} (p = {ex['prob']:.2f})")
        return render.vstack([cells, render.text_block(caption, set_width, 12, pad=1)], gap=2)

    label_w = 60
    head = render.hstack([render.text_block("", label_w), render.text_block("correctly classified", set_width, 15),
                          render.text_block("misclassified", set_width, 15)], gap=24)
    sub = render.text_block("(I) image   (II) heatmap   (III) CLEAR map", set_width, 12, colour=(70, 70, 70))
    subhead = render.hstack([render.text_block("", label_w), sub, sub], gap=24)
    body = [head, subhead]
    for digit, good, bad in rows:
        body.append(render.hstack([render.text_block(f"digit\n{names[digit]}", label_w, 14),
                                   example_set(good, "correctly classified"), example_set(bad, "misclassified")],
                                  gap=24, valign="top"))
    legend = render.legend(colours, names, max_width=label_w + 2 * set_width + 48)
    key = ("heatmap: hot (black-red-yellow-white) = response of the true digit's kernel; green = the strongest other "
           "kernel where it beats the true one.\nCLEAR map: hue = dominant class (legend above), brightness = its "
           "response. Images: white digit on black, as the model sees them.")
    return render.pad(render.vstack([legend] + body + [render.text_block(key, size=12, align="left", pad=1,
                                                                           colour=(70, 70, 70))], gap=6), 12)


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    backend = backend_name(args.backend)  # an unusable backend is refused before any work
    model = load_model(args)
    net = model.net
    out = prepare_out(args.out)
    images, labels = builtin.heldout()
    if args.limit:
        keep = np.unique(np.linspace(0, len(labels) - 1, min(args.limit, len(labels))).round().astype(int))
        images, labels, pool_index = images[keep], labels[keep], keep
    else:
        pool_index = np.arange(len(labels))
    source = f"{len(labels):,} held-out digits"
    say(f"model: {model.description}")
    say(f"input: the built-in {source} (never trained on); {builtin.PREPROCESSING}")
    pred = classify(net, builtin.to_input(images))
    say(f"classified the {source}: {100 * np.mean(pred == labels):.1f}% correct "
        f"({int(np.sum(pred != labels))} misclassified)")
    rng = np.random.default_rng(args.seed)
    picks = []  # (digit, kind, position in pool)
    for d in range(10):
        for kind, mask in (("correct", (labels == d) & (pred == d)), ("misclassified", (labels == d) & (pred != d))):
            where = np.flatnonzero(mask)
            picks.append((d, kind, int(rng.choice(where)) if where.size else None))
    chosen = [p for p in picks if p[2] is not None]
    items = [Item(f"digit{d}-{kind}-heldout{int(pool_index[i]):04d}", f"built-in held-out #{int(pool_index[i])}",
                  images[i][None].astype(np.float64) / 255.0, int(labels[i])) for d, kind, i in chosen]
    say(f"backend: {backend}; explaining {len(items)} examples (a correctly classified and, "
        "where one exists, a misclassified example of each digit)")
    pre = Preprocess()
    options = {"preprocess": pre, "rectify": args.rectify, "reduce": args.reduce, "vmax": None,
               "binary_threshold": 0.1}
    args.classes = args.top_k = args.vmax = None
    records, done, skipped = run_explain_items(items, [it.label for it in items], model, args, out / "images",
                                               None, options, args.quiet)
    # the figure is drawn from the saved maps, so a rerun that skipped every image still draws it
    examples, palette = {}, None
    for (d, kind, i), item in zip(chosen, items):
        with np.load(out / "images" / item.name / "maps.npz", allow_pickle=False) as m:
            p = int(np.argmax(m["logits"]))
            palette = m["palette"]  # every example has all ten classes, in order: the same palette
            resp = m["responses"][None].astype(np.float64)
            examples[(d, kind)] = {"index": int(pool_index[i]), "pred": p, "prob": float(m["probabilities"][p]),
                                   "image": render.pixels_to_rgb(item.pixels), "clear": m["rgb"],
                                   "heatmap": heatmap(resp, np.array([d]))[0]}
        if (p == d) != (kind == "correct"):
            say(f"warning: held-out #{int(pool_index[i])} is {'correct' if p == d else 'misclassified'} with the "
                f"{backend} backend but was picked as {kind} by the float32 torch pass.")
    rows = [(d, examples.get((d, "correct")), examples.get((d, "misclassified"))) for d in range(10)]
    colours = palette_rgb(palette)
    fig = figure3(rows, colours, net.class_names, args.scale or 4, source)
    render.save_png(out / "figure3.png", fig)
    missing = [str(d) for d, _, bad in rows if bad is None]
    for d, good, bad in rows:
        say(f"  digit {d}: correct #{good['index'] if good else '-'}; misclassified "
            + (f"#{bad['index']} as {net.class_names[bad['pred']]} (p = {bad['prob']:.2f})" if bad else "none"))
    say(f"demo: wrote {out / 'figure3.png'} and per-image outputs for {len(items)} examples in {out / 'images'} "
        f"({done} explained, {skipped} already done)"
        + (f"; no misclassified example exists for digit(s) {', '.join(missing)}" if missing else "")
        + f"; {time.perf_counter() - t0:.1f} s")
    return 0


# ---- evaluate (Table 1) -------------------------------------------------------------------------------

def _load_labelled(args, net: Network, pre: Preprocess):
    if args.data is None:
        if not hasattr(args, "_model_builtin") or not args._model_builtin:
            raise ClearmapsError("evaluate needs --data FILE.npz (images and labels) for a --checkpoint; the "
                                 "built-in held-out set goes with the built-in model.")
        images, labels = builtin.heldout()
        return builtin.to_input(images).astype(np.float64), labels, "the built-in 1,000 held-out MNIST digits"
    c, h, w = net.input_shape
    items, _ = load_images([args.data], pre, c, (h, w))
    if any(it.label is None for it in items):
        raise ClearmapsError(f"--data {args.data!r} has no labels; store them under 'labels' in the .npz.")
    labels = np.array([it.label for it in items], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= net.num_classes:
        raise ClearmapsError(f"--data labels run {labels.min()} .. {labels.max()}; the network has classes "
                             f"0 .. {net.num_classes - 1}.")
    shapes = {it.pixels.shape for it in items}
    if len(shapes) != 1:
        raise ClearmapsError(f"--data images have different sizes {sorted(shapes)}; use --resize.")
    return np.stack([it.pixels for it in items]), labels, str(args.data)


def table1(net: Network, pixels: np.ndarray, labels: np.ndarray, taus, background: float, pre: Preprocess,
           backend: str, batch_size: int, quiet: bool) -> list[dict]:
    """Section 4.3: accuracy on full images, on only their strong features, and without them.

    Strong features of an image are M = r(x|true) > τ · max r(x|true), r from :func:`clearmaps.explain` with
    only the true class; the rest ("only strong") or M itself ("without") is filled with ``background``
    (pixel units, before normalisation).
    """
    x = pre.normalise(pixels)
    bg = pre.background(background, x.shape[1])
    n = len(labels)
    r_true = np.zeros((n, *x.shape[2:]))
    full_pred = np.zeros(n, dtype=np.int64)
    bar = progress(range(n), n, "attentive responses", quiet)
    it = iter(bar)
    for c in np.unique(labels):  # explain takes one class list per batch: group images by their true class
        idx = np.flatnonzero(labels == c)
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            e = explain(net, x[b], classes=[int(c)], backend=backend, vmax=None)
            r_true[b] = e.responses[:, 0]
            full_pred[b] = e.predicted
            for _ in b:
                next(it, None)
    if hasattr(bar, "close"):
        bar.close()
    rows = []
    for tau in taus:
        mask = strong_feature_mask(r_true, tau)
        only = classify(net, keep_strong(x.astype(np.float64), mask, bg))
        without = classify(net, remove_strong(x.astype(np.float64), mask, bg))
        ink = pixels.max(axis=1) > 0.5  # bright pixels (for MNIST: the stroke); how much of M lies on them
        rows.append({"tau": tau, "n": n, "full": 100 * float(np.mean(full_pred == labels)),
                     "only_strong": 100 * float(np.mean(only == labels)),
                     "without_strong": 100 * float(np.mean(without == labels)),
                     "strong_pixels_pct": 100 * float(mask.mean()),
                     "strong_on_bright_pct": 100 * float((mask & ink).sum() / max(mask.sum(), 1))})
    return rows


def cmd_evaluate(args) -> int:
    t0 = time.perf_counter()
    backend = backend_name(args.backend)  # an unusable backend is refused before any work
    model = load_model(args)
    net = model.net
    args._model_builtin = model.builtin
    pre = preprocess_from(args)
    for tau in args.tau:
        if not 0 <= tau < 1:
            raise ClearmapsError(f"--tau {tau}; tau is a fraction of the strongest response, in [0, 1).")
    if not 0 <= args.background <= 1:
        raise ClearmapsError(f"--background {args.background}; give it in pixel units in [0, 1] (0 = black, "
                             "0.5 = grey), before normalisation.")
    out = prepare_out(args.out)
    pixels, labels, source = _load_labelled(args, net, pre)
    if args.limit:
        keep = np.unique(np.linspace(0, len(labels) - 1, min(args.limit, len(labels))).round().astype(int))
        pixels, labels = pixels[keep], labels[keep]
        source += f" (an evenly spaced subset of {len(labels)})"
    say(f"model: {model.description}")
    say(f"data: {source}, {len(labels)} images")
    say(pre.describe(net.input_shape[0], net.input_shape[1:]))
    say(f"backend: {backend}; strong features: r(x|true) > tau * max r(x|true), tau = "
        f"{', '.join(str(t) for t in args.tau)}; fill = {args.background} (pixel units)")
    rows = table1(net, pixels, labels, args.tau, args.background, pre, args.backend, args.batch_size, args.quiet)
    header = ["tau", "n", "full", "only_strong", "without_strong", "strong_pixels_pct", "strong_on_bright_pct"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.2f}" if isinstance(v, float) and k != "tau" else v) for k, v in r.items()})
    render.save_text(out / "table1.csv", buf.getvalue())
    report = {"protocol": "Kumar, Wong & Taylor 2017, Section 4.3 / Table 1", "data": source,
              "model": model.description,
              "backend": backend, "background": args.background, "rows": rows,
              "bright_pixels_pct": 100 * float(np.mean(pixels.max(axis=1) > 0.5)),
              "paper_mnist_row": PAPER_TABLE1_MNIST,
              "note": "the paper's row is on the full MNIST test set with its own network and an unstated tau; "
                      "ours is on different data and a different model, so the numbers compare only in kind."}
    render.save_text(out / "table1.json", json.dumps(report, indent=2) + "\n")
    say("")
    say(f"Table 1 (accuracy %, {len(labels)} images)     full   only strong   without strong   strong px %")
    for r in rows:
        say(f"  ours, tau = {r['tau']:<5}                   {r['full']:6.2f}   {r['only_strong']:11.2f}   "
            f"{r['without_strong']:14.2f}   {r['strong_pixels_pct']:10.1f}")
    p = PAPER_TABLE1_MNIST
    say(f"  paper, MNIST (other data/model)        {p['full']:6.2f}   {p['only_strong']:11.2f}   "
        f"{p['without_strong']:14.2f}")
    say(f"  (bright pixels, > 0.5, cover {100 * float(np.mean(pixels.max(axis=1) > 0.5)):.1f}% of these images; "
        "strong px % is the share of the image in the mask)")
    say(f"evaluate: {len(labels)} images, {len(rows)} tau value(s); wrote {out / 'table1.csv'} and "
        f"{out / 'table1.json'}; {time.perf_counter() - t0:.1f} s")
    return 0


# ---- argument parsing ---------------------------------------------------------------------------------

def _model_options(p):
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="PATH", help="a .safetensors/.pt state dict (default: the built-in "
                                                        "MNIST model)")
    g.add_argument("--arch", metavar="NAME|SPEC", help=f"architecture: a preset ({', '.join(PRESETS)}) or a JSON "
                                                       "spec file; optional when the checkpoint carries its own")
    g.add_argument("--class-names", metavar="FILE", help="one class name per line (or a JSON list)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="where CLEAR is computed (default: auto)")
    g.add_argument("--batch-size", type=int, default=16, help="images per explain() call (default 16)")


def _preprocess_options(p):
    g = p.add_argument_group("preprocessing (printed at the start of every run)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--grayscale", dest="mode", action="store_const", const="grayscale",
                   help="convert images to 1 channel")
    m.add_argument("--rgb", dest="mode", action="store_const", const="rgb", help="convert images to 3 channels")
    g.add_argument("--resize", metavar="N|HxW", help="resize images (bilinear) to N x N or H x W")
    g.add_argument("--invert", action="store_true", help="x -> 1 - x (dark digits on white paper -> MNIST style)")
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="subtract per channel, after / 255")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="divide per channel, after --mean")


def _clear_options(p):
    p.add_argument("--rectify", action=argparse.BooleanOptionalAction, default=True,
                   help="rectify at every ReLU on the way back (the deconvnet; default on)")
    p.add_argument("--reduce", default="sum", choices=("sum", "max", "norm"),
                   help="how the input channels are reduced to one map (default sum)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clearmaps", description="CLEAR maps (Class-Enhanced Attentive Response; "
                                "Kumar, Wong & Taylor 2017) for convolutional classifiers.")
    p.add_argument("--version", action="version", version=f"clearmaps {__import__('clearmaps').__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,explain,evaluate}")
    sub.required = True

    d = sub.add_parser("demo", help="the paper's Fig. 3 from the built-in MNIST model and held-out digits",
                       description="Writes DIR/figure3.png (for each digit 0-9 a correctly classified and a "
                                   "misclassified held-out example: image, heatmap, CLEAR map; colour legend on "
                                   "top) and DIR/images/<example>/ with every per-image output.")
    d.add_argument("--out", default="clearmaps-demo", help="output folder (default clearmaps-demo)")
    d.add_argument("--seed", type=int, default=0, help="which examples are picked (default 0)")
    d.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # a smaller pool, for quick tests
    d.add_argument("--scale", type=int, help="pixels per digit pixel in the figure (default 4)")
    d.add_argument("--backend", default="auto", choices=BACKENDS, help="where CLEAR is computed (default: auto)")
    d.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    d.add_argument("--force", action="store_true", help="redo examples already done")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    _clear_options(d)
    d.set_defaults(func=cmd_demo, checkpoint=None, arch=None, class_names=None)

    e = sub.add_parser("explain", help="CLEAR maps and figures for images",
                       description="For every image: DIR/<name>/clear.png, overlay.png, heatmap.png, binary.png, "
                                   "legend.png, panel.png and maps.npz (responses, dominant class and response, "
                                   "logits). Without images: the built-in sample digits.")
    e.add_argument("inputs", nargs="*", help="image files, folders, .npy/.npz batches")
    e.add_argument("--out", default="clearmaps-out", help="output folder (default clearmaps-out)")
    e.add_argument("--classes", metavar="LIST", help="class ids or names, comma separated (default: all)")
    e.add_argument("--top-k", type=int, metavar="K", help="the K most likely classes of each image")
    e.add_argument("--true-label", metavar="CLASS", help="true class (id or name) of every image: the heatmap and "
                                                         "binary map are drawn for it (default: labels of an .npz, "
                                                         "else the predicted class)")
    e.add_argument("--vmax", help="brightness scale: a number, 'batch' or a percentile 'p99' (default: each "
                                  "image's maximum)")
    e.add_argument("--binary-threshold", type=float, default=0.1, metavar="F",
                   help="the binary map marks pixels whose dominant response exceeds F times the image's "
                        "strongest (default 0.1)")
    e.add_argument("--scale", type=int, help="nearest-neighbour upscaling of the PNGs (default: longer side >= 224)")
    e.add_argument("--force", action="store_true", help="redo images already done")
    e.add_argument("--quiet", action="store_true", help="no progress bar or per-image lines")
    _model_options(e)
    _preprocess_options(e)
    _clear_options(e)
    e.set_defaults(func=cmd_explain)

    v = sub.add_parser("evaluate", help="the paper's Table 1: accuracy with only / without strong features",
                       description="Strong features: r(x|true) > tau * max r(x|true). Prints accuracy on full "
                                   "images, on only the strong features (the rest filled with --background) and "
                                   "without them; writes DIR/table1.csv and DIR/table1.json.")
    v.add_argument("--data", metavar="FILE.npz", help="labelled images ('images', 'labels'); default: the "
                                                      "built-in 1,000 held-out MNIST digits")
    v.add_argument("--tau", type=float, nargs="+", default=[DEFAULT_TAU],
                   help=f"threshold(s) as a fraction of the strongest response (default {DEFAULT_TAU})")
    v.add_argument("--background", type=float, default=0.0,
                   help="fill in pixel units [0, 1] before normalisation: 0 = black (MNIST, default), 0.5 = grey")
    v.add_argument("--limit", type=int, help="use an evenly spaced subset of this many images")
    v.add_argument("--out", default="clearmaps-evaluate", help="output folder (default clearmaps-evaluate)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    _model_options(v)
    _preprocess_options(v)
    v.set_defaults(func=cmd_evaluate)
    return p


def main(argv=None) -> int:
    """Run the ``clearmaps`` command; returns the exit status (0 ok, 1 bad input, 2 bad usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("batch_size", "scale", "limit", "top_k"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1.")
    if getattr(args, "vmax", None) is not None:
        args.vmax = _vmax(args.vmax)
    try:
        return args.func(args)
    except ClearmapsError as exc:
        print(f"clearmaps: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clearmaps: interrupted; every file already written is complete, rerun to finish the rest.",
              file=sys.stderr)
        return 130
    except OSError as exc:  # e.g. a full disk while writing
        print(f"clearmaps: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
