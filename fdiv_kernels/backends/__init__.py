"""Backends: each registers ``fdiv::divergence_fwd_<name>`` with one shared schema.

Signature of every forward op::

    (student[N,V], teacher[N,V], valid[N] bool, base:int, swap:bool, param:float,
     inv_temperature:float, grad_student:bool, grad_teacher:bool)
      -> (loss[N] float32 (float64 for float64 input), grad_student[N,V] | [0], grad_teacher[N,V] | [0])

The gradients are those of each row's loss with an upstream gradient of 1; the backward of every
backend is the shared in-place row scale ``fdiv::scale_rows_``.
"""
