"""The ``clearmaps`` subcommands (demo, explain, evaluate), run after :mod:`clearmaps.cli` has parsed and
checked their arguments. Each reads the argparse namespace once and passes plain values on; the paper's
protocols themselves are in :mod:`clearmaps.paper`, the per-image files in :mod:`clearmaps.cli_outputs`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import builtin
from .backends import get_backend
from .cli_outputs import FILES, ExplainOptions, explain_items, prepare_out
from .images import Item, Preprocess, load_images, parse_size
from .reference import ClearmapsError, Network


def say(*args) -> None:
    print(*args, flush=True)


# ---- the model ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Model:
    net: Network
    description: str
    fingerprint: str  # what per-image outputs record, so that another model's outputs are not reused
    builtin: bool


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MAX_CLASS_NAMES_BYTES = 16 << 20


def _read_class_names(path) -> list[str]:
    """One class name per line, or a JSON list of strings; each name printable (one line) and unique."""
    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size > MAX_CLASS_NAMES_BYTES:
            raise ClearmapsError(f"--class-names file {str(p)!r} is {p.stat().st_size:,} bytes; a list of class "
                                 f"names is at most {MAX_CLASS_NAMES_BYTES:,}.")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClearmapsError(f"--class-names file {str(p)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClearmapsError(f"--class-names file {str(p)!r} could not be read ({exc}).") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError; nesting deeper than Python recurses
            raise ClearmapsError(f"--class-names file {str(p)!r} is not a valid JSON list "
                                 f"({type(exc).__name__}).") from None
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) and not isinstance(n, bool)
                                                  for n in names):
            raise ClearmapsError(f"--class-names file {str(p)!r} must hold a JSON list of names (strings).")
        names = [str(n) for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ClearmapsError(f"--class-names file {str(p)!r} is empty; write one class name per line.")
    bad = next((n for n in names if not n.isprintable()), None)
    if bad is not None:
        raise ClearmapsError(f"--class-names file {str(p)!r} has the name {bad!r}; a class name is one line of "
                             "printable text.")
    return names


def _factory(spec: str):
    """The callable named by --model MODULE:FACTORY (MODULE a dotted module importable from here, or a .py
    file)."""
    import importlib
    import importlib.util
    import os
    import sys

    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ClearmapsError(f"--model {spec!r}: the file {where!r} does not exist.")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:  # a user's own module beside them
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
    except ClearmapsError:
        raise
    except Exception as exc:  # the user's own code: say what it raised, in one line
        raise ClearmapsError(f"--model {spec!r}: importing {where!r} failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}).") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ClearmapsError(f"--model {spec!r}: {where!r} has no function or class {name!r}.")
    return factory


def _own_model(spec, checkpoint, class_names, size) -> Model:
    import torch

    from .checkpoints import check_state_dict, read_state_dict
    from .torch_io import from_torch

    try:
        module = _factory(spec)()
    except ClearmapsError:
        raise
    except Exception as exc:
        raise ClearmapsError(f"--model {spec!r}: calling the factory failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}).") from None
    if not isinstance(module, torch.nn.Module):
        raise ClearmapsError(f"--model {spec!r} returned a {type(module).__name__}; expected a torch.nn.Module.")
    fingerprint = "model:" + spec
    if checkpoint is not None:
        sd, _ = read_state_dict(checkpoint)
        check_state_dict(module, sd, checkpoint)
        module.load_state_dict(sd, strict=False)
        fingerprint += ":" + _sha256(Path(checkpoint))
    names = _read_class_names(class_names) if class_names else None
    first = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    shape = None if size is None or first is None else (first.in_channels, *size)
    net = from_torch(module.float(), class_names=names, input_shape=shape)
    c, h, w = net.input_shape
    desc = (f"{spec}" + (f" with weights {checkpoint}" if checkpoint else " (its own initial weights)")
            + f"; {net.num_classes} classes; input {c} channel(s), {'any size' if h is None else f'{h}x{w}'}")
    return Model(net, desc, fingerprint, False)


def load_model(checkpoint=None, arch=None, class_names=None, model=None, size=None) -> Model:
    """The built-in model (no ``checkpoint``), a checkpoint read with ``arch`` and a class-names file, or the
    user's own torch module built by ``model`` ("MODULE:FACTORY") with ``checkpoint`` as its state dict,
    captured for images of ``size`` (H, W) when given."""
    if model is not None:
        return _own_model(model, checkpoint, class_names, size)
    if checkpoint is None:
        net = builtin.load_model()
        meta = builtin.info()
        desc = (f"built-in allcnn-mnist, trained on real MNIST digits ({meta['train']} for training, "
                f"held-out accuracy {100 * meta['held_out_accuracy']:.1f}% on {meta['held_out']}); it expects "
                f"{builtin.PREPROCESSING}")
        return Model(net, desc, "builtin:" + _sha256(builtin.WEIGHTS), True)
    from .checkpoints import load_checkpoint

    path = Path(checkpoint)
    names = _read_class_names(class_names) if class_names else None
    net = load_checkpoint(path, arch=arch, class_names=names)
    c, h, w = net.input_shape
    desc = (f"{path} (arch {arch or 'from the file'}; {net.num_classes} classes; input {c} channel(s), "
            f"{'any size' if h is None else f'{h}x{w}'})")
    return Model(net, desc, _sha256(path), False)


def backend_name(name: str) -> str:
    """``name`` and, for "auto", what it resolved to; an unusable backend is refused here, before any work."""
    used = get_backend(name).__name__.rsplit(".", 1)[-1]
    return used if name == used else f"{name} -> {used}"


def resolve_cli_classes(classes: list | None, top_k: int | None, net: Network):
    """--classes (parsed tokens) / --top-k → what :func:`clearmaps.explain` takes, checked against ``net``."""
    from .explanation import resolve_classes

    if top_k is not None:
        if top_k > net.num_classes:
            raise ClearmapsError(f"--top-k {top_k} asks for the {top_k} most likely classes; the network has "
                                 f"{net.num_classes} (use --top-k 1 .. {net.num_classes}).")
        return f"top{top_k}"
    if classes is None:
        return None
    # a name wins over an id, so class names that look like numbers mean themselves
    chosen = [t if t in net.class_names or not t.lstrip("-").isdigit() else int(t) for t in classes]
    try:
        resolve_classes(chosen, net, np.zeros((1, net.num_classes)))
    except ClearmapsError as exc:
        raise ClearmapsError(f"--classes {','.join(classes)}: {exc}") from None
    return chosen


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


def _evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    if not limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, min(limit, n)).round().astype(int))


# ---- explain ------------------------------------------------------------------------------------------

AUTO_STORE_ABOVE = 100  # --outputs auto: more images than this go into a results store


def _count_images(inputs) -> int:
    """How many images plain inputs (files, flat folders, .npy/.npz) hold, without reading pixels; 0 when
    something cannot be counted (then the per-image path reports it in its own words)."""
    from .datasets import ArrayFile, _open_array_file
    from .images import ARRAY_SUFFIXES, IMAGE_SUFFIXES

    n = 0
    for text in inputs:
        p = Path(text)
        try:
            if p.is_dir():
                n += sum(1 for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
                n += sum(_count_images([q]) for q in p.iterdir() if q.is_file() and q.suffix.lower() in ARRAY_SUFFIXES)
            elif p.suffix.lower() in ARRAY_SUFFIXES:
                array = _open_array_file(p)[0] if p.suffix.lower() == ".npz" else ArrayFile(p, None)
                n += array.count
                array.close()
            else:
                n += 1
        except (ClearmapsError, OSError):
            return 0
    return n


def output_kind(args) -> tuple[str, str]:
    """("store" or "png", why) for --outputs and the inputs."""
    from .datasets import is_dataset

    if args.outputs != "auto":
        return args.outputs, f"--outputs {args.outputs}"
    if args.workers is not None or args.scheduler is not None:
        return "store", "a Dask run writes a results store"
    if args.inputs and is_dataset(args.inputs):
        return "store", "a dataset (class folders, a glob or a CSV) goes into a results store"
    n = _count_images(args.inputs) if args.inputs else 0
    if n > AUTO_STORE_ABOVE:
        return "store", f"{n:,} images (more than {AUTO_STORE_ABOVE}) go into a results store"
    return "png", "a few images get a folder of PNGs each (--outputs store for a results store)"


def explain_command(args, pre: Preprocess, vmax, classes: list | None, transform=None, palette=None) -> int:
    t0 = time.perf_counter()
    backend = backend_name(args.backend)
    kind, why = output_kind(args)
    if kind == "store" and palette is not None:
        raise ClearmapsError(f"--palette colours the per-image pictures, and these inputs go into a results store "
                             f"({why}), which keeps the class ids; its report colours them by class id. Drop "
                             "--palette, or use --outputs png.")
    model = load_model(args.checkpoint, args.arch, args.class_names, args.model,
                       parse_size(args.resize) if args.resize else
                       (transform.crop if transform is not None and transform.crop else None))
    net = model.net
    chosen = resolve_cli_classes(classes, args.top_k, net)
    true_all = class_id(net, args.true_label, "--true-label") if args.true_label is not None else None
    if kind == "store":
        return _explain_dataset(args, model, transform, vmax, chosen, true_all, backend, why, t0)
    if args.batch_size is None:
        args.batch_size = 16
    out = prepare_out(args.out)
    c, h, w = net.input_shape
    say(f"model: {model.description}")
    if args.inputs and (transform is not None and (transform.short_side or transform.crop)
                        or _new_kind(args.inputs)):
        items = _dataset_items(args.inputs, net, transform, args.skip_bad)
        say(f"input: {len(items)} image(s) from {', '.join(args.inputs)}")
    elif args.inputs:
        items, notes = load_images(args.inputs, pre, c, (h, w), keep_original=True)
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
    say(transform.describe(c, (h, w)) if transform is not None else pre.describe(c, (h, w)))
    for item in items:
        if item.label is not None and not 0 <= item.label < net.num_classes:
            raise ClearmapsError(f"{item.source} has label {item.label}; the network has classes "
                                 f"0 .. {net.num_classes - 1}.")
    if model.builtin:
        hint = builtin.inverted_hint([item.pixels for item in items], [item.name for item in items], pre.invert)
        if hint:
            say(hint)
    trues = [true_all if true_all is not None else item.label for item in items]
    say(f"backend: {backend}; classes: "
        f"{'all ' + str(net.num_classes) if chosen is None else chosen}; method={args.method}, rectify={args.rectify}, "
        f"reduce={args.reduce}, vmax={vmax or 'per image max'}, palette={_palette_words(palette)}")
    options = ExplainOptions(backend=args.backend, classes=chosen, rectify=args.rectify, reduce=args.reduce,
                             vmax=vmax, preprocess=pre, binary_threshold=args.binary_threshold, method=args.method,
                             palette=palette)
    records, done, skipped = explain_items(net, model.fingerprint, items, trues, out, options, args.scale,
                                           args.force, args.batch_size, args.quiet)
    labelled = [r for r in records if r["true"] is not None]
    correct = sum(r["true"] == r["predicted"] for r in labelled)
    for r in records if len(records) <= 40 and not args.quiet else []:
        say(f"  {r['name']}: predicted {r['predicted']} (p = {r['probability']:.2f})"
            + (f", true {r['true']}" if r["true"] is not None else ""))
    say(f"explained {done} image(s)" + (f", skipped {skipped} already done (--force redoes them)" if skipped else "")
        + (f"; {correct}/{len(labelled)} correctly classified" if labelled else "")
        + f"; {time.perf_counter() - t0:.1f} s; outputs in {out}/<image>/ ({', '.join(FILES)})")
    return 0


def _palette_words(palette) -> str:
    if palette is None or palette == "hues":
        return "hues (class c of N: hue c/N)"
    return palette if isinstance(palette, str) else ",".join(f"{h:g}" for h in palette)


def _new_kind(inputs) -> bool:
    from .datasets import is_dataset

    return is_dataset(inputs)


def _dataset_items(inputs, net: Network, transform, skip_bad: bool) -> list:
    """A small dataset (class folders, glob, CSV) as per-image Items, for --outputs png."""
    from .datasets import open_dataset

    ds = open_dataset(inputs, net.class_names, skip_bad)
    c, h, w = net.input_shape
    size = (h, w) if h is not None else ds.first_size(transform, c)
    pixels, errors = ds.read(0, len(ds), transform, c, size, skip_bad)
    seen: set = set()
    items = []
    for i, (name, err) in enumerate(zip(ds.names, errors)):
        if err is not None:
            say(f"skipped: {err}")
            continue
        base = str(Path(name).with_suffix("")).replace("/", "--").replace("\\", "--")
        unique, n = base, 1
        while unique in seen:
            n += 1
            unique = f"{base}-{n}"
        seen.add(unique)
        label = int(ds.labels[i])
        items.append(Item(unique, str(ds.path_of(name)) if ds.array is None else name, pixels[i],
                          label if label >= 0 else None))
    return items


def _explain_dataset(args, model: Model, transform, vmax, chosen, true_all, backend: str, why: str, t0) -> int:
    """clearmaps explain DATASET: every image into a results store (see clearmaps.store), resumable."""
    from .dataset_run import RunOptions, prepare_run, run_dataset
    from .datasets import open_dataset

    net = model.net
    if true_all is not None:
        raise ClearmapsError("--true-label is for a few images; a dataset's labels come from its class folders, "
                             "its CSV or its .npz.")
    if args.scale is not None:
        raise ClearmapsError("--scale sizes per-image PNGs; a results store keeps the maps at the model's size "
                             "(the report scales them). Drop --scale, or use --outputs png.")
    if not args.inputs:
        raise ClearmapsError("no dataset given; pass a folder of class folders, a glob, a CSV (path,label) or an "
                             ".npz to write a results store.")
    say(f"model: {model.description}")
    ds = open_dataset(args.inputs, net.class_names, args.skip_bad)
    labelled = int((ds.labels >= 0).sum())
    say(f"input: {ds.kind} {ds.source}: {len(ds):,} images" + (f", {labelled:,} labelled" if labelled else
                                                                ", no labels") + f" ({why})")
    for note in ds.notes:
        say(f"input: {note}")
    for left in ds.skipped:
        say(f"left out: {left}")
    c, h, w = net.input_shape
    options = RunOptions(backend=args.backend, classes=chosen, rectify=args.rectify, reduce=args.reduce,
                         vmax=vmax, method=getattr(args, "method", None), transform=transform,
                         responses=args.responses, thumbnails=args.thumbnails, skip_bad=args.skip_bad)
    store, size, todo = prepare_run(net, ds, args.out, options, args.batch_size, model.fingerprint, args.force)
    say(transform.describe(c, size))
    where = (f"a local Dask cluster of {args.workers} worker processes" if args.workers else
             f"the Dask cluster at {args.scheduler}" if args.scheduler else "this process")
    say(f"backend: {backend}; classes: {'all ' + str(net.num_classes) if chosen is None else chosen}; "
        f"method={args.method}, rectify={args.rectify}, reduce={args.reduce}, vmax={vmax or 'per image max'}; on {where}")
    say(f"store: {store.url} ({store.chunks} chunk(s) of {store.chunk_size} images; "
        + (f"{store.chunks - len(todo)} already done, resuming)" if len(todo) < store.chunks else "new)"))
    summary = run_dataset(net, ds, args.out, options, store.chunk_size, model.fingerprint, False,
                          args.workers, args.scheduler, quiet=args.quiet)
    table = summary.store.table()
    correct = [v for v in table.column("correct").to_pylist() if v is not None]
    for file, error in summary.bad[:20]:
        say(f"skipped: {error}")
    if len(summary.bad) > 20:
        say(f"skipped: ... and {len(summary.bad) - 20} more (the table's 'error' column lists every one)")
    say(f"explained {summary.explained:,} image(s)"
        + (f", {summary.already:,} already done" if summary.already else "")
        + (f", {len(summary.bad)} bad image(s) skipped" if summary.bad else "")
        + (f"; {sum(correct)}/{len(correct)} correctly classified ({100 * sum(correct) / len(correct):.1f}%)"
           if correct else "")
        + (f"; {summary.images_per_second:.1f} images/s" if summary.explained else "")
        + f"; {time.perf_counter() - t0:.1f} s in all")
    say(f"results: {store.url}/images.parquet (one row per image), {store.url}/maps.zarr (the maps); browse them "
        f"with: clearmaps report {args.out}")
    return 0


def report_command(args) -> int:
    from .report import write_report

    t0 = time.perf_counter()
    out = args.out or str(Path(args.results) / "report")
    index, stats = write_report(args.results, out, page_size=args.page_size, quiet=args.quiet)
    say(f"report: {stats['images']:,} images, accuracy {stats['accuracy']}; wrote {index} "
        f"({time.perf_counter() - t0:.1f} s); open it in a browser, no server needed")
    return 0


# ---- demo (Fig. 3) ------------------------------------------------------------------------------------
