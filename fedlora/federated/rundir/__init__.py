"""The run directory: everything a run keeps on disk, and every check and write that touches it.

:mod:`~fedlora.federated.rundir.opening` opens one (its default name, the checks before a fresh run or a resume,
crash recovery), :mod:`~fedlora.federated.rundir.storage` holds :class:`~fedlora.federated.rundir.storage.RunDir`
(its layout, crash-safe writes, checkpoints, client states, free space), :mod:`~fedlora.federated.rundir.paths` its
path policy (nothing written outside it, no link followed, safe client directory names), and
:mod:`~fedlora.federated.rundir.adapter` what it holds of the model (``global_adapter/``, the run's size).
"""
