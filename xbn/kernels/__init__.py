"""Fast paths, one module per backend (``xbn.kernels.<backend name>``).

A module here registers its functions with :func:`xbn.backends.register_kernel` when imported;
:func:`xbn.backends.registered_kernels` imports it the first time a layer of that backend is
built. Every fast path has the signature of its generic counterpart in :mod:`xbn.functional`
and is tested for parity against it.
"""
