"""Column layout of a coefficient row: the contract between schedulers and kernels.

Every step of every scheduler is, per element and in fp32 (fp64 for fp64 storage):

    x0  = AS*(AX*x + AM*m)                  # model output m -> data estimate
    x0  = clip(x0)                          # none | clamp(+-r) | clamp(x0, -s_b, s_b) / s_b
    d   = PX*x + P0*x0 + PM*m               # the history value (D for ++, eps for dpmsolver)
    out = OX*x + O0*d + OM*m + O1*h1 + O2*h2 + ON*z

A row holds these twelve scalars; a coefficient tensor has shape (1, K) or (B, K) and is
read per batch row. Kernels index columns by these constants, never by position literals.

Why the separate scale AS: epsilon prediction is x0 = (x - sqrt(1-a)*m) / sqrt(a). Folding
1/sqrt(a) into AX and AM would (1) turn a = 0 (zero-SNR schedules at t = T-1) into
inf*x - inf*m = NaN, where diffusers gets +-inf that clipping then bounds, and (2) round the
large terms x/sqrt(a) and m*sqrt(1-a)/sqrt(a) separately before they cancel, where diffusers
cancels first and scales after. With AS the step rounds as diffusers does.
"""

AX, AM, PX, P0, PM, OX, O0, OM, O1, O2, ON, AS = range(12)
NUM_COEFFICIENTS = 12

COLUMN_NAMES = ("ax", "am", "px", "p0", "pm", "ox", "o0", "om", "o1", "o2", "on", "as")

CLIP_MODES = ("none", "clamp", "threshold")
