"""The paper's protocols as commands: ``clearmaps demo`` (Fig. 3 on the built-in model) and
``clearmaps evaluate`` (Table 1, and with ``--method all`` the evidence for every response method)."""

from __future__ import annotations

import csv
import io
import json
import time

import numpy as np

from . import builtin, paper, render
from .cli_commands import _evenly_spaced, backend_name, load_model, say
from .cli_outputs import ExplainOptions, Progress, explain_items, prepare_out
from .images import Item, Preprocess, load_images, parse_size
from .reference import ClearmapsError, Network


def demo_command(args, palette=None) -> int:
    t0 = time.perf_counter()
    backend = backend_name(args.backend)
    model = load_model()
    net = model.net
    out = prepare_out(args.out)
    images, labels = builtin.heldout()
    pool_index = _evenly_spaced(len(labels), args.limit)
    images, labels = images[pool_index], labels[pool_index]
    source = f"{len(labels):,} held-out digits"
    say(f"model: {model.description}")
    say(f"input: the built-in {source} (never trained on); {builtin.PREPROCESSING}")
    pred = paper.classify(net, builtin.to_input(images))
    say(f"classified the {source}: {100 * np.mean(pred == labels):.1f}% correct "
        f"({int(np.sum(pred != labels))} misclassified)")
    picks = paper.figure3_picks(labels, pred, net.num_classes, args.seed)
    chosen = [(c, kind, i) for c, good, bad in picks for kind, i in (("correct", good), ("misclassified", bad))
              if i is not None]
    items = [Item(f"digit{d}-{kind}-heldout{int(pool_index[i]):04d}", f"built-in held-out #{int(pool_index[i])}",
                  images[i][None].astype(np.float64) / 255.0, int(labels[i])) for d, kind, i in chosen]
    say(f"backend: {backend}; method: {args.method}; explaining {len(items)} examples (a correctly classified "
        "and, where one exists, a misclassified example of each digit)")
    options = ExplainOptions(backend=args.backend, rectify=args.rectify, reduce=args.reduce, method=args.method,
                             palette=palette)
    _, done, skipped = explain_items(net, model.fingerprint, items, [it.label for it in items], out / "images",
                                     options, args.scale, args.force, args.batch_size, args.quiet)
    # the figure is drawn from the saved maps, so a rerun that skipped every image still draws it
    examples, palette = {}, None
    for (d, kind, i), item in zip(chosen, items):
        with np.load(out / "images" / item.name / "maps.npz", allow_pickle=False) as m:
            palette = m["palette"]  # hues by class id (every example explains all ten classes)
            ex = paper.figure3_example(int(pool_index[i]), d, item.pixels, m["probabilities"], m["classes"],
                                       m["responses"], m["rgb"], args.scale or 4)
        examples[(d, kind)] = ex
        if (ex.predicted == d) != (kind == "correct"):
            say(f"warning: held-out #{ex.index} is {'correct' if ex.predicted == d else 'misclassified'} with "
                f"the {backend} backend but was picked as {kind} by the float32 torch pass.")
    rows = [(d, examples.get((d, "correct")), examples.get((d, "misclassified"))) for d in range(net.num_classes)]
    fig = paper.figure3_layout(rows, palette, net.class_names, args.scale or 4, source)
    render.save_png(out / "figure3.png", fig)
    missing = [str(d) for d, _, bad in rows if bad is None]
    for d, good, bad in rows:
        say(f"  digit {d}: correct #{good.index if good else '-'}; misclassified "
            + (f"#{bad.index} as {net.class_names[bad.predicted]} (p = {bad.probability:.2f})" if bad else "none"))
    say(f"demo: wrote {out / 'figure3.png'} and per-image outputs for {len(items)} examples in {out / 'images'} "
        f"({done} explained, {skipped} already done)"
        + (f"; no misclassified example exists for digit(s) {', '.join(missing)}" if missing else "")
        + f"; {time.perf_counter() - t0:.1f} s")
    return 0


# ---- evaluate (Table 1) -------------------------------------------------------------------------------

def _load_labelled(data, net: Network, pre: Preprocess, builtin_model: bool):
    if data is None:
        if not builtin_model:
            raise ClearmapsError("evaluate needs --data FILE.npz (images and labels) for a --checkpoint; the "
                                 "built-in held-out set goes with the built-in model.")
        images, labels = builtin.heldout()
        return builtin.to_input(images).astype(np.float64), labels, "the built-in 1,000 held-out MNIST digits"
    c, h, w = net.input_shape
    items, _ = load_images([data], pre, c, (h, w))
    if any(it.label is None for it in items):
        raise ClearmapsError(f"--data {data!r} has no labels; store them under 'labels' in the .npz.")
    labels = np.array([it.label for it in items], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= net.num_classes:
        raise ClearmapsError(f"--data labels run {labels.min()} .. {labels.max()}; the network has classes "
                             f"0 .. {net.num_classes - 1}.")
    shapes = {it.pixels.shape for it in items}
    if len(shapes) != 1:
        raise ClearmapsError(f"--data images have different sizes {sorted(shapes)}; use --resize.")
    return np.stack([it.pixels for it in items]), labels, str(data)


def evaluate_command(args, pre: Preprocess) -> int:
    t0 = time.perf_counter()
    backend = backend_name(args.backend)
    model = load_model(args.checkpoint, args.arch, args.class_names, args.model,
                       parse_size(args.resize) if args.resize else None)
    net = model.net
    out = prepare_out(args.out)
    pixels, labels, source = _load_labelled(args.data, net, pre, model.builtin)
    hint = builtin.inverted_hint(list(pixels), [f"#{i}" for i in range(len(pixels))], pre.invert) \
        if model.builtin and args.data else None
    if args.limit:
        keep = _evenly_spaced(len(labels), args.limit)
        pixels, labels = pixels[keep], labels[keep]
        source += f" (an evenly spaced subset of {len(labels)})"
    say(f"model: {model.description}")
    say(f"data: {source}, {len(labels)} images")
    if hint:
        say(hint)
    say(pre.describe(net.input_shape[0], net.input_shape[1:]))
    say(f"backend: {backend}; strong features: r(x|true) > tau * max r(x|true), tau = "
        f"{', '.join(str(t) for t in args.tau)}; fill = {args.background} (pixel units)")
    if args.method == "all":
        return _evidence(args, net, model, pixels, labels, source, pre, backend, out, t0)
    say(f"method: {args.method}")
    bar = Progress(len(labels), "attentive responses", args.quiet)
    try:
        rows = paper.table1(net, pixels, labels, args.tau, args.background, pre, args.backend, args.batch_size,
                            bar.update, method=args.method)
    finally:
        bar.close()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=paper.TABLE1_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.2f}" if isinstance(v, float) and k != "tau" else v) for k, v in r.items()})
    render.save_text(out / "table1.csv", buf.getvalue())
    bright = 100 * float(np.mean(pixels.max(axis=1) > paper.BRIGHT))
    report = {"protocol": "Kumar, Wong & Taylor 2017, Section 4.3 / Table 1", "data": source,
              "model": model.description, "backend": backend, "method": args.method, "background": args.background,
              "rows": rows,
              "bright_pixels_pct": bright, "paper_mnist_row": paper.PAPER_TABLE1_MNIST,
              "note": "the paper's row is on the full MNIST test set with its own network and an unstated tau; "
                      "ours is on different data and a different model, so the numbers compare only in kind."}
    render.save_text(out / "table1.json", json.dumps(report, indent=2) + "\n")
    say("")
    line = "  {:<36}{:>8}{:>14}{:>17}{:>14}"
    say(line.format(f"Table 1 (accuracy %, {len(labels)} images)", "full", "only strong", "without strong",
                    "strong px %"))
    for r in rows:
        say(line.format(f"ours ({args.method}), tau = {r['tau']}", f"{r['full']:.2f}", f"{r['only_strong']:.2f}",
                        f"{r['without_strong']:.2f}", f"{r['strong_pixels_pct']:.1f}"))
    p = paper.PAPER_TABLE1_MNIST
    say(line.format("paper, MNIST (other data/model)", f"{p['full']:.2f}", f"{p['only_strong']:.2f}",
                    f"{p['without_strong']:.2f}", "-"))
    say(f"  (bright pixels, > 0.5, cover {bright:.1f}% of these images; strong px % is the share of the image in "
        "the mask)")
    say(f"evaluate: {len(labels)} images, {len(rows)} tau value(s); wrote {out / 'table1.csv'} and "
        f"{out / 'table1.json'}; {time.perf_counter() - t0:.1f} s")
    return 0


EVIDENCE_COLUMNS = ("method", "full", "only_strong", "without_strong", "strong_pixels_pct", "share_correct",
                    "share_misclassified", "spearman_top_layer", "spearman_all_layers", "ms_per_image", "n")


def _evidence(args, net, model, pixels, labels, source, pre, backend, out, t0) -> int:
    """``evaluate --method all``: Table 1, the true-class share and the model-randomisation check for every
    response method (clearmaps.evidence), printed and written as evidence.csv / evidence.json."""
    from . import evidence

    tau = args.tau[0]
    if len(args.tau) > 1:
        say(f"--method all uses one tau: {tau}")
    say(f"methods: {', '.join(evidence.METHODS)}; true-class share over all classes; randomisation check on "
        f"{min(args.sanity_images, len(labels))} images")
    rows = evidence.evaluate_methods(net, pixels, labels, preprocess=pre, backend=args.backend, tau=tau,
                                     background=args.background, sanity_images=args.sanity_images,
                                     batch_size=max(args.batch_size, 64),
                                     progress=None if args.quiet else lambda m: say(f"  {m}: done"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EVIDENCE_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    render.save_text(out / "evidence.csv", buf.getvalue())
    render.save_text(out / "evidence.json", json.dumps(
        {"data": source, "model": model.description, "backend": backend, "tau": tau, "background": args.background,
         "rows": rows, "note": "true-class share: the fraction of the map's positive dominant response on pixels "
                               "whose dominant class is the true class; randomisation: mean Spearman correlation "
                               "of |r(x|true)| between the trained model and the model with its top layers "
                               "re-drawn (Adebayo et al. 2018): lower means the map depends on the model"},
        indent=2, default=float) + "\n")
    line = "  {:<18}{:>7}{:>8}{:>9}{:>11}{:>11}{:>11}{:>11}{:>10}"
    say("")
    say(line.format("method", "full", "only", "without", "share ok", "share mis", "rand top", "rand all", "ms/img"))
    for r in rows:
        say(line.format(r["method"], f"{r['full']:.1f}", f"{r['only_strong']:.1f}", f"{r['without_strong']:.1f}",
                        f"{r['share_correct']:.3f}", f"{r['share_misclassified']:.3f}",
                        f"{r['spearman_top_layer']:.3f}", f"{r['spearman_all_layers']:.3f}",
                        f"{r['ms_per_image']:.1f}"))
    say(f"  (Table 1 at tau = {tau}: accuracy % on full images / only strong features / without them; share: of "
        "the map's dominant response on true-class pixels, correct / misclassified images; rand: Spearman of "
        "the true-class map with the model's top layer / all layers re-drawn, lower is better)")
    say(f"evaluate: {len(labels)} images, {len(rows)} methods; wrote {out / 'evidence.csv'} and "
        f"{out / 'evidence.json'}; {time.perf_counter() - t0:.1f} s")
    return 0
