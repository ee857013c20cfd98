"""The float32 constants of the noise kernels, shared by the numba and Triton versions.

A module of its own (numpy only) so that the Triton kernels, which must give the same
bits as the numba ones, do not import numba: a CUDA-only machine needs no numba.
"""

import numpy as np

_F = np.float32

_TWO_M24 = _F(2.0**-24)
_L0 = _F(7.0376836292e-2)
_L1 = _F(-1.1514610310e-1)
_L2 = _F(1.1676998740e-1)
_L3 = _F(-1.2420140846e-1)
_L4 = _F(1.4249322787e-1)
_L5 = _F(-1.6668057665e-1)
_L6 = _F(2.0000714765e-1)
_L7 = _F(-2.4999993993e-1)
_L8 = _F(3.3333331174e-1)
_LN2_LO = _F(-2.12194440e-4)
_LN2_HI = _F(0.693359375)
_ANGLE = _F(np.pi * 2.0**-23)
_S0 = _F(-1.9515295891e-4)
_S1 = _F(8.3321608736e-3)
_S2 = _F(-1.6666654611e-1)
_C0 = _F(2.443315711809948e-5)
_C1 = _F(-1.388731625493765e-3)
_C2 = _F(4.166664568298827e-2)
