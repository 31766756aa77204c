"""Wrong: the back-projection's unpooling loses the value of each plane's last pooled window, as a kernel
whose loop bound is one short would."""

from clearmaps import reference as ref

from . import clear_with, reference_functions, walk_back


def _unpool_dropping_one(y, switches, size):
    y = y.copy()
    y[:, :, -1, -1] = 0
    return ref.unpool(y, switches, size)


def backproject(net, trace, classes=None, rectify=True):
    return walk_back(net, trace, classes, rectify, _unpool_dropping_one)


clear_from_trace = clear_with(backproject)
reference_functions(globals())
