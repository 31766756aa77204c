"""Wrong: the back-projection never rectifies, whatever ``rectify`` says (Eq. 2 instead of the deconvnet's)."""

from clearmaps import reference as ref

from . import clear_with, reference_functions


def backproject(net, trace, classes=None, rectify=True):
    return ref.backproject(net, trace, classes, False)


clear_from_trace = clear_with(backproject)
reference_functions(globals())
