"""Triton kernels and their launchers; installed as ``peft_ops.kernels``.

Nothing here knows about autograd or ``nn``: launchers validate nothing the public API has not
already checked, allocate outputs, pick a configuration and launch.
"""
