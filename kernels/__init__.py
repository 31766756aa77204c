"""clearmaps.kernels: the reference's functions, fast.

A backend is a module with the same names and signatures as :mod:`clearmaps.reference` for the pieces
``clearmaps.explain`` calls (the backend contract):

    forward(net, x) -> Trace                      switches (int64, same tie rule), sizes, z, logits, probabilities
    clear_from_trace(net, trace, classes, rectify=True, reduce="sum", palette=None, vmax=None,
                     keep_responses=True) -> Clear
    conv2d, conv_transpose2d, max_pool_with_switches, unpool, backproject, reduce_channels, dominant, compose

``classes`` reaching ``clear_from_trace`` is always an int64 (B, K) array of valid class ids (the bindings
resolve names, lists and top-k first). Backends compute in float32; results meet the tolerances of
docs/design.md against the float64 reference.

    cpu.py      Numba on the CPU
    cuda/       Numba CUDA kernels and CuPy GEMMs on the GPU
"""
