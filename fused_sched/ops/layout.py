"""Column layout of a coefficient row: the contract between schedulers and kernels.

Every step of every scheduler is, per element and in fp32 (fp64 for fp64 storage):

    x0  = AX*x + AM*m                       # model output m -> data estimate
    x0  = clip(x0)                          # none | clamp(+-r) | clamp(x0, -s_b, s_b) / s_b
    d   = PX*x + P0*x0 + PM*m               # the history value (D for ++, eps for dpmsolver)
    out = OX*x + O0*d + OM*m + O1*h1 + O2*h2 + ON*z

A row holds these eleven scalars; a coefficient tensor has shape (1, K) or (B, K) and is
read per batch row. Kernels index columns by these constants, never by position literals.
"""

AX, AM, PX, P0, PM, OX, O0, OM, O1, O2, ON = range(11)
NUM_COEFFICIENTS = 11

COLUMN_NAMES = ("ax", "am", "px", "p0", "pm", "ox", "o0", "om", "o1", "o2", "on")

CLIP_MODES = ("none", "clamp", "threshold")
