"""The ``clearmaps`` command.

    clearmaps demo [--out DIR]                      the paper's Fig. 3 on the built-in MNIST model
    clearmaps explain [IMAGES ...] [--out DIR]      CLEAR maps, overlays, heatmaps, binary maps, panels
    clearmaps evaluate [--tau T ...] [--out DIR]    the paper's Table 1 (strong features) on a labelled set
    clearmaps explain DATASET --out DIR             a whole dataset (ImageFolder tree, glob, CSV, .npz) into a
                                                    resumable results store [--workers N | --scheduler ADDR]
    clearmaps report DIR                            a static index.html to browse a results store

Without ``--checkpoint`` the built-in model (ALL-CNN-style, trained on real MNIST digits) is used. Every
mistake in the input ends in one line ``clearmaps: error: ...`` and a non-zero exit status, never a
traceback, and in the words of the command line (``--backend cpu``, not ``backend='cpu'``). Outputs are
written atomically; a rerun skips images already done unless ``--force``.

This module parses and checks the arguments and nothing more: torch, Numba and the backends are imported
only once the arguments are known to be good (by :mod:`clearmaps.cli_commands`), so a typo fails at once.
"""

from __future__ import annotations

import argparse
import re
import sys

from .backends import BACKENDS
from .cli_words import cli_words
from .images import Preprocess, parse_size
from .paper import DEFAULT_TAU
from .reference import ClearmapsError, resolve_vmax


def _vmax(text: str | None):
    """--vmax as clearmaps.explain takes it: a number, "batch" or a percentile "pNN"."""
    if text is None:
        return None
    try:
        vmax = float(text)
    except ValueError:
        vmax = text
    try:
        resolve_vmax([[[1.0]]], vmax)
    except ClearmapsError:
        raise ClearmapsError(f"--vmax {text}; expected a positive number, 'batch' (one scale for all images) or "
                             "a percentile such as p99.") from None
    return vmax


def _preprocess(args) -> Preprocess:
    return Preprocess(mode=args.mode, resize=parse_size(args.resize) if args.resize else None, invert=args.invert,
                      mean=args.mean, std=args.std)


PALETTES = ("hues", "colorblind")  # clearmaps.palettes.PALETTES, without its import


def _palette(text: str | None):
    """--palette as clearmaps.explain takes it: None, "hues", "colorblind", or a tuple of hues in [0, 1]."""
    if text is None or text in PALETTES:
        return text
    try:
        hues = tuple(float(t) for t in text.split(","))
    except ValueError:
        hues = ()
    if not hues or not all(0 <= h <= 1 for h in hues):
        raise ClearmapsError(f"--palette {text}; expected hues (class colours by class id), colorblind (at most "
                             "10 classes, chosen to stay apart in simulated protan-, deutan- and tritanopia) or hues in [0, 1] "
                             "separated by commas: one per class, or one per --classes entry.")
    return hues


def _classes(text: str | None) -> list | None:
    """--classes as a list of tokens (ids or names; the network decides which, once it is loaded)."""
    if text is None:
        return None
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise ClearmapsError("--classes is empty; give ids or names separated by commas, e.g. --classes 3,5,8.")
    return tokens


def check_arguments(args) -> None:
    """Everything about the arguments that can be checked without a model or a file, as ClearmapsError."""
    model = getattr(args, "model", None)
    if model is not None:
        if getattr(args, "arch", None) is not None:
            raise ClearmapsError("give --model (your torch module) or --arch (a preset or JSON spec), not both.")
        if ":" not in model or not all(model.rsplit(":", 1)):
            raise ClearmapsError(f"--model {model!r}; expected MODULE:FACTORY, e.g. torchvision.models:resnet50 or "
                                 "mynet:build (a module importable from here, or a .py file path, and a function "
                                 "or class in it that returns the torch module when called without arguments).")
    elif getattr(args, "checkpoint", None) is None and (getattr(args, "arch", None) is not None
                                                       or getattr(args, "class_names", None) is not None):
        raise ClearmapsError("--arch and --class-names describe a --checkpoint; give the checkpoint too "
                             "(without one the built-in MNIST model is used).")
    if args.command == "explain":
        _check_dataset_options(args)
        if args.classes is not None and args.top_k is not None:
            raise ClearmapsError("give --classes or --top-k, not both.")
        _classes(args.classes)
        _vmax(args.vmax)
        if _palette(args.palette) is not None and args.outputs == "store":
            raise ClearmapsError("--palette colours the per-image pictures; a results store keeps the class ids and "
                                 "its report colours them by class id. Drop --palette, or use --outputs png.")
        if not 0 <= args.binary_threshold < 1:
            raise ClearmapsError(f"--binary-threshold {args.binary_threshold}; expected a fraction in [0, 1).")
    if args.command == "evaluate":
        for tau in args.tau:
            if not 0 <= tau < 1:
                raise ClearmapsError(f"--tau {tau}; tau is a fraction of the strongest response, in [0, 1).")
        if not 0 <= args.background <= 1:
            raise ClearmapsError(f"--background {args.background}; give it in pixel units in [0, 1] (0 = black, "
                                 "0.5 = grey), before normalisation.")
    if getattr(args, "rectify", True) is False and getattr(args, "method", "deconvnet") != "deconvnet":
        raise ClearmapsError(f"--no-rectify applies to --method deconvnet (Eq. 2 literally); --method {args.method} "
                             "has its own ReLU rule.")
    if args.command == "demo":
        _palette(args.palette)
    if args.command in ("explain", "evaluate"):
        _preprocess(args)
    if args.command == "explain":
        transform_of(args)


def _check_dataset_options(args) -> None:
    """The options of a dataset run (a results store), checked before anything is read."""
    if args.workers is not None and args.scheduler is not None:
        raise ClearmapsError("give --workers N (a local Dask cluster) or --scheduler ADDRESS (a running one), "
                             "not both.")
    if args.workers is not None and args.workers < 1:
        raise ClearmapsError(f"--workers {args.workers}; expected at least 1 worker process.")
    if args.scheduler is not None and args.scheduler != "config" and \
            not re.match(r"^[a-z][a-z0-9+]*://[^/\s]+$", args.scheduler):
        raise ClearmapsError(f"--scheduler {args.scheduler!r}; expected a Dask scheduler address such as "
                             "tcp://10.0.0.5:8786, or 'config' for the one in Dask's configuration.")
    if args.outputs == "png" and (args.workers is not None or args.scheduler is not None):
        raise ClearmapsError("--workers and --scheduler write a results store; drop --outputs png.")
    if args.outputs == "png" and (args.responses or not args.thumbnails):
        raise ClearmapsError("--responses and --no-thumbnails describe a results store; drop --outputs png "
                             "(per-image maps.npz files always hold the responses).")
    if args.short_side is not None:
        if args.short_side < 1:
            raise ClearmapsError(f"--short-side {args.short_side}; expected a positive number of pixels.")
        if args.resize:
            raise ClearmapsError("give --resize (an exact size) or --short-side (the shorter side, aspect kept), "
                                 "not both.")


def transform_of(args):
    """--short-side and --crop with the other preprocessing options, as clearmaps.datasets.Transform."""
    from .datasets import Transform

    try:
        crop = parse_size(args.crop) if args.crop else None
    except ClearmapsError:
        raise ClearmapsError(f"--crop {args.crop!r}; expected a size like 224 or 224x192 (H x W).") from None
    return Transform(_preprocess(args), short_side=args.short_side, crop=crop)


# ---- argument parsing ---------------------------------------------------------------------------------

class _HelpFormatter(argparse.HelpFormatter):
    """Fills in the preset names only when help is shown: they live beside torch, which a typo should not
    wait for."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action) or ""
        if "{presets}" in text:
            try:
                from .checkpoints import PRESETS
                presets = ", ".join(PRESETS)
            except ImportError:  # without torch no checkpoint can be read anyway
                presets = "see clearmaps.PRESETS"
            text = text.replace("{presets}", presets)
        return text


def _model_options(p, batch_default=16):
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="PATH", help="a .safetensors/.pt state dict (default: the built-in "
                                                        "MNIST model)")
    g.add_argument("--arch", metavar="NAME|SPEC", help="architecture: a preset ({presets}) or a JSON spec file; "
                                                       "optional when the checkpoint carries its own")
    g.add_argument("--model", metavar="MODULE:FACTORY",
                   help="your own torch classifier: a function or class that builds it, e.g. "
                        "torchvision.models:resnet50 or mynet.py:Net; --checkpoint is then its state dict "
                        "(captured with torch.export: residual blocks, concatenations, MLP heads all work)")
    g.add_argument("--class-names", metavar="FILE", help="one class name per line (or a JSON list)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="where CLEAR is computed (default: auto)")
    g.add_argument("--batch-size", type=int, default=batch_default,
                   help="images per explain() call (default 16" + ("" if batch_default else
                                                                   "; for a results store, sized to the backend and "
                                                                   "the model, at most 256: one chunk") + ")")


def _preprocess_options(p, crop=False):
    g = p.add_argument_group("preprocessing (printed at the start of every run)")
    if crop:
        g.add_argument("--short-side", type=int, metavar="N", help="resize so that the shorter side is N, the "
                                                                   "aspect kept (torchvision's Resize(N))")
        g.add_argument("--crop", metavar="N|HxW", help="centre crop to N x N or H x W after resizing "
                                                       "(torchvision's CenterCrop)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--grayscale", dest="mode", action="store_const", const="grayscale",
                   help="convert images to 1 channel")
    m.add_argument("--rgb", dest="mode", action="store_const", const="rgb", help="convert images to 3 channels")
    g.add_argument("--resize", metavar="N|HxW", help="resize images (bilinear) to N x N or H x W")
    g.add_argument("--invert", action="store_true", help="x -> 1 - x (dark digits on white paper -> MNIST style)")
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="subtract per channel, after / 255")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="divide per channel, after --mean")


METHODS = ("deconvnet", "guided", "gradient", "input_x_gradient")  # clearmaps.reference.METHODS, without its import
# the demo's method, chosen by the evidence of `clearmaps evaluate --method all` on the held-out digits (README,
# "Response methods"): guided backpropagation's maps give the true class 60% of their dominant response (the
# deconvnet's 24%) and its strong features carry the decision (Table 1: 94.6% only strong, 7.4% without)
DEMO_METHOD = "guided"


def _method_option(p, default: str, all_too: bool = False):
    p.add_argument("--method", default=default, choices=METHODS + (("all",) if all_too else ()),
                   help=f"the class-specific response that feeds the CLEAR map: deconvnet (the paper), guided "
                        f"(guided backpropagation), gradient, input_x_gradient (default {default})"
                        + ("; all: the evidence table of every method" if all_too else ""))


def _palette_option(p):
    p.add_argument("--palette", metavar="NAME|HUES",
                   help="class colours, fixed by class id: hues (default: class c of N gets hue c/N), colorblind "
                        "(at most 10 classes; every pair stays apart in protanopia, deuteranopia and tritanopia), "
                        "or hues in [0, 1] separated by commas, one per class (or one per --classes entry, in "
                        "its order; with --top-k, one per rank)")


def _clear_options(p):
    p.add_argument("--rectify", action=argparse.BooleanOptionalAction, default=True,
                   help="rectify at every ReLU on the way back (the deconvnet; default on; --no-rectify gives "
                        "Eq. 2 literally, with --method deconvnet only)")
    p.add_argument("--reduce", default="sum", choices=("sum", "max", "norm"),
                   help="how the input channels are reduced to one map (default sum)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clearmaps", formatter_class=_HelpFormatter,
                                description="CLEAR maps (Class-Enhanced Attentive Response; Kumar, Wong & Taylor "
                                            "2017) for convolutional classifiers.")
    p.add_argument("--version", action="version", version=f"clearmaps {__import__('clearmaps').__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,explain,evaluate,report}")
    sub.required = True

    d = sub.add_parser("demo", formatter_class=_HelpFormatter,
                       help="the paper's Fig. 3 from the built-in MNIST model and held-out digits",
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
    _method_option(d, DEMO_METHOD)
    _palette_option(d)

    e = sub.add_parser("explain", formatter_class=_HelpFormatter, help="CLEAR maps and figures for images",
                       description="A dataset (a folder of class folders, a glob, a CSV of path,label, or more "
                                   "than 100 images) goes into a results store in DIR: maps.zarr (CLEAR maps, "
                                   "dominant class and response, chunked by batch), images.parquet (one row per "
                                   "image) and store.json (the settings); a rerun does only what is missing; "
                                   "browse it with clearmaps report DIR. A few images get one folder each: "
                                   "DIR/<name>/clear.png, overlay.png, heatmap.png, binary.png, legend.png, "
                                   "panel.png and maps.npz. Without images: the built-in sample digits.")
    e.add_argument("inputs", nargs="*", help="a dataset (class-folder tree, 'glob/**/*.png', list.csv, set.npz), or "
                                             "image files, folders, .npy/.npz batches")
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
    r = e.add_argument_group("datasets and the results store")
    r.add_argument("--outputs", choices=("auto", "store", "png"), default="auto",
                   help="store: a results store; png: per-image folders (small sets); auto (default): a store for "
                        "a dataset or more than 100 images, else per-image folders")
    r.add_argument("--workers", type=int, metavar="N", help="run the chunks on a local Dask cluster of N worker "
                                                              "processes (needs dask[distributed])")
    r.add_argument("--scheduler", metavar="ADDRESS", help="run the chunks on a running Dask cluster, e.g. "
                                                          "tcp://10.0.0.5:8786, or 'config' (Dask's configured "
                                                          "address); workers must reach the images and --out")
    r.add_argument("--skip-bad", action="store_true", help="leave out unreadable images, empty class folders and "
                                                           "unknown labels, and list them (default: stop at the "
                                                           "first, with its name)")
    r.add_argument("--responses", action="store_true", help="also store the K response maps of every image "
                                                            "(N x K x H x W float32)")
    r.add_argument("--no-thumbnails", dest="thumbnails", action="store_false",
                   help="do not store the inputs' thumbnails (the report then shows no inputs or overlays)")
    _model_options(e, batch_default=None)
    _preprocess_options(e, crop=True)
    _clear_options(e)
    _method_option(e, "deconvnet")
    _palette_option(e)

    v = sub.add_parser("evaluate", formatter_class=_HelpFormatter,
                       help="the paper's Table 1: accuracy with only / without strong features",
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
    v.add_argument("--sanity-images", type=int, default=100, metavar="N",
                   help="--method all: images of the model-randomisation check (default 100, evenly spaced)")
    _method_option(v, "deconvnet", all_too=True)
    _model_options(v)
    _preprocess_options(v)

    rp = sub.add_parser("report", formatter_class=_HelpFormatter, help="a static HTML report of a results store",
                        description="Writes DIR/index.html (opens from disk, no server): accuracy, the confusion "
                                    "matrix, the CLEAR matrix (for each true class, which classes dominate its maps "
                                    "and how strongly) and a gallery of CLEAR maps, overlays and inputs, filterable "
                                    "and sortable, a page at a time.")
    rp.add_argument("results", metavar="RESULTS", help="the --out folder of a clearmaps explain run on a dataset")
    rp.add_argument("--out", help="where the report goes (default RESULTS/report)")
    rp.add_argument("--page-size", type=int, default=48, help="images per gallery page (default 48)")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _heavy_imports():
    """Import the command's modules (torch, Numba and the backends load here) with SIGINT and SIGTERM held
    back: torch's import aborts the process (SIGABRT, no message) when a KeyboardInterrupt unwinds through it.
    A signal that arrives meanwhile is delivered when the imports are done, and ends the run as usual."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    blocked = hasattr(signal, "pthread_sigmask") and threading_main()
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        from . import cli_commands, firstrun
        from .cli_outputs import CompileProgress
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    return cli_commands, firstrun, CompileProgress


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run(args) -> int:
    check_arguments(args)
    cli_commands, firstrun, CompileProgress = _heavy_imports()

    previous = firstrun.set_reporter(CompileProgress(getattr(args, "quiet", False)))
    try:
        if args.command == "demo":
            from . import cli_paper

            return cli_paper.demo_command(args, _palette(args.palette))
        if args.command == "explain":
            return cli_commands.explain_command(args, _preprocess(args), _vmax(args.vmax), _classes(args.classes),
                                                transform_of(args), _palette(args.palette))
        if args.command == "report":
            return cli_commands.report_command(args)
        from . import cli_paper

        return cli_paper.evaluate_command(args, _preprocess(args))
    finally:
        firstrun.set_reporter(previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it ends as Ctrl-C does: temp files removed, one line."""


def _terminate(signum, frame):
    raise Terminated


def one_line(text: str) -> str:
    """A message as one line of printable text: a newline or a terminal escape in a file name or an argument
    is shown escaped (\\n, \\x1b), not obeyed."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def main(argv=None) -> int:
    """Run the ``clearmaps`` command; returns the exit status (0 ok, 1 bad input, 2 bad usage, 130 interrupted,
    143 terminated)."""
    import signal
    import threading

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        for flag in ("batch_size", "scale", "limit", "top_k", "page_size"):
            if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
                parser.error(f"--{flag.replace('_', '-')} must be at least 1.")
        return _run(args)
    except ClearmapsError as exc:
        print(f"clearmaps: error: {one_line(cli_words(str(exc)))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"clearmaps: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; every file already "
              "written is complete, rerun to finish the rest.", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except OSError as exc:  # e.g. a full disk while writing
        print(f"clearmaps: error: {one_line(exc.strerror or exc)}"
              f"{f': {one_line(exc.filename)}' if exc.filename else ''}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
