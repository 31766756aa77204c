"""API words in the ``clearmaps`` command's errors reworded as its options: ``backend='cpu'`` -> ``--backend
cpu``, ``pass arch=`` -> ``give --arch``, ``classes='top20'`` -> ``--top-k 20``. Standard library only: the
command imports it while it checks its arguments."""

from __future__ import annotations

import re

# Python argument names that lower layers put in their messages -> the option that sets them here
_OPTIONS = {"arch": "--arch", "backend": "--backend", "background": "--background", "batch_size": "--batch-size",
            "class_names": "--class-names", "classes": "--classes", "crop": "--crop", "mean": "--mean",
            "palette": "--palette",
            "reduce": "--reduce", "scheduler": "--scheduler", "short_side": "--short-side", "workers": "--workers",
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
