"""The compiled CPU path of the fit (numba): matching pursuit and the atom-update sweep, each as one compiled
call per thread that reads the data in place. On GPUs, in data-parallel fits and with ``kernel="torch"`` the
batched torch loops run instead (:mod:`pipeline.core.coders`, :mod:`pipeline.core.atom_update`).

Kernels (numba; each holds every function it calls, so numba's per-file cache check sees every change):

* :mod:`~pipeline.core.cpu.mp_kernel`: matching pursuit on one sample's correlation row;
* :mod:`~pipeline.core.cpu.sweep_kernel`: a whole atom-update sweep: the per-atom rank-1 refits, the residual
  corrections, and the atomics and spin barrier its threads meet at.

Drivers (torch tensors in and out; they plan, allocate and start the threads):

* :mod:`~pipeline.core.cpu.mp_driver`: :func:`~pipeline.core.cpu.mp_driver.mp_codes`, for :mod:`pipeline.core.coders`;
* :mod:`~pipeline.core.cpu.update_driver`: :func:`~pipeline.core.cpu.update_driver.update`, for
  :mod:`pipeline.core.atom_update`;
* :mod:`~pipeline.core.cpu.runtime`: the ``kernel`` choice, the lazy import of the kernels, the threads.

Their ahead-of-time compilation is :func:`pipeline.core.warm.warm_up` (above the coder and the update it runs).
"""
