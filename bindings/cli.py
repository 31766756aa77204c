"""The ``clearmaps`` command.

    clearmaps demo [--out DIR]                      the paper's Fig. 3 on the built-in MNIST model
    clearmaps explain [IMAGES ...] [--out DIR]      CLEAR maps, overlays, heatmaps, binary maps, panels
    clearmaps evaluate [--tau T ...] [--out DIR]    the paper's Table 1 (strong features) on a labelled set

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
        if args.classes is not None and args.top_k is not None:
            raise ClearmapsError("give --classes or --top-k, not both.")
        _classes(args.classes)
        _vmax(args.vmax)
        if not 0 <= args.binary_threshold < 1:
            raise ClearmapsError(f"--binary-threshold {args.binary_threshold}; expected a fraction in [0, 1).")
    if args.command == "evaluate":
        for tau in args.tau:
            if not 0 <= tau < 1:
                raise ClearmapsError(f"--tau {tau}; tau is a fraction of the strongest response, in [0, 1).")
        if not 0 <= args.background <= 1:
            raise ClearmapsError(f"--background {args.background}; give it in pixel units in [0, 1] (0 = black, "
                                 "0.5 = grey), before normalisation.")
    if args.command in ("explain", "evaluate"):
        _preprocess(args)


# ---- errors in the command line's words ---------------------------------------------------------------

# Python argument names that lower layers put in their messages -> the option that sets them here
_OPTIONS = {"arch": "--arch", "backend": "--backend", "background": "--background", "batch_size": "--batch-size",
            "class_names": "--class-names", "classes": "--classes", "mean": "--mean", "reduce": "--reduce",
            "resize": "--resize", "std": "--std", "tau": "--tau", "threshold": "--binary-threshold",
            "top_k": "--top-k", "vmax": "--vmax"}
_VALUE = r"'[^']*'|\"[^\"]*\"|\([^()]*\)|\[[^\[\]]*\]|[-+\w.]+"
_ASSIGNMENT = re.compile(rf"(?<![\w.-])(pass )?({'|'.join(_OPTIONS)})=({_VALUE})?")
_TOP_K = re.compile(r"(?<![\w.-])classes=['\"]top-?(\d+)['\"]")
_SUBJECT = re.compile(r"^arch (?=')")  # "arch 'x' is neither a preset nor a JSON file"
# "use --backend cpu or 'auto'", "use --backend cuda (or 'auto')": the alternatives are backends too
_ALTERNATIVE = re.compile(r"(--backend [\w-]+\)?,? \(?or )'([\w-]+)'")


def _cli_value(value: str) -> str:
    value = value.strip()
    if value[:1] in "'\"":
        return value[1:-1]
    if value[:1] in "([":
        return " ".join(_cli_value(v) for v in re.findall(_VALUE, value[1:-1]))
    return value


def _reword(match: re.Match) -> str:
    give, name, value = match.groups()
    option = _OPTIONS[name]
    return ("give " if give else "") + option + (f" {_cli_value(value)}" if value else "")


def cli_words(message: str) -> str:
    """A message from the Python API in the command line's words: ``backend='cpu'`` -> ``--backend cpu``,
    ``pass arch=`` -> ``give --arch``, ``classes='top20'`` -> ``--top-k 20``."""
    message = _TOP_K.sub(lambda m: f"--top-k {m.group(1)}", _SUBJECT.sub("--arch ", message))
    message = _ASSIGNMENT.sub(_reword, message)
    while _ALTERNATIVE.search(message):
        message = _ALTERNATIVE.sub(lambda m: f"{m.group(1)}--backend {m.group(2)}", message)
    return message


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


def _model_options(p):
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
    p = argparse.ArgumentParser(prog="clearmaps", formatter_class=_HelpFormatter,
                                description="CLEAR maps (Class-Enhanced Attentive Response; Kumar, Wong & Taylor "
                                            "2017) for convolutional classifiers.")
    p.add_argument("--version", action="version", version=f"clearmaps {__import__('clearmaps').__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,explain,evaluate}")
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

    e = sub.add_parser("explain", formatter_class=_HelpFormatter, help="CLEAR maps and figures for images",
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
    _model_options(v)
    _preprocess_options(v)
    return p


def _run(args) -> int:
    check_arguments(args)
    from . import cli_commands  # torch, Numba and the backends load from here on

    if args.command == "demo":
        return cli_commands.demo_command(args)
    if args.command == "explain":
        return cli_commands.explain_command(args, _preprocess(args), _vmax(args.vmax), _classes(args.classes))
    return cli_commands.evaluate_command(args, _preprocess(args))


def main(argv=None) -> int:
    """Run the ``clearmaps`` command; returns the exit status (0 ok, 1 bad input, 2 bad usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("batch_size", "scale", "limit", "top_k"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1.")
    try:
        return _run(args)
    except ClearmapsError as exc:
        print(f"clearmaps: error: {cli_words(str(exc))}", file=sys.stderr)
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
