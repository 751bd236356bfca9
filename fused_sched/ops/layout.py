"""Column layout of a coefficient row: the contract between schedulers and kernels.

Every step of every scheduler is, per element and in fp32 (fp64 for fp64 storage):

    x0  = AS*(AX*x + AM*m + AL*m)           # model output m -> data estimate
    x0c = clip(x0)                          # none | clamp(+-r) | clamp(x0, -s_b, s_b) / s_b
    d   = PS*(PX*x + P0*x0c + PM*m)         # the history value (D for ++, eps for dpmsolver)
    d   = US*(UX*x + UM*m)  where x0c == x0 and US != 0   # the same value without x0; only when clipping
    out = OX*x + OC*x0c + O0*d + OM*m + O1*(d - h1) + O2*(h1 - h2) + ON*z  # OC*x0c only when clipping

A row holds these eighteen scalars; a coefficient tensor has shape (1, K) or (B, K) and is
read per batch row. Kernels index columns by these constants, never by position literals.

Why the separate scale AS: epsilon prediction is x0 = (x - sqrt(1-a)*m) / sqrt(a). Folding
1/sqrt(a) into AX and AM would (1) turn a = 0 (zero-SNR schedules at t = T-1) into
inf*x - inf*m = NaN, where diffusers gets +-inf that clipping then bounds, and (2) round the
large terms x/sqrt(a) and m*sqrt(1-a)/sqrt(a) separately before they cancel, where diffusers
cancels first and scales after. With AS the step rounds as diffusers does. PS is the same
for the history value of the noise-prediction solvers: eps = (x - alpha*x0)/sigma (sample
prediction, or any prediction with thresholding) cancels where sigma is small (the last
steps), and with 1/sigma folded into PX and P0 the rounding of x/sigma and (alpha/sigma)*x0
decided it: measured up to 6x farther from a float64 evaluation than diffusers; scaled
after, up to 4x. What remained was the round trip through the clipped x0 (US below).

Why US, UX, UM, the history value where clipping left x0 unchanged: with thresholding, the
noise-prediction solvers store eps = (x - alpha*x0c)/sigma with x0 = (x - sigma*eps)/alpha
found from the model's eps (diffusers' round trip). Where x0c == x0 that is eps itself in
exact arithmetic, but evaluated it is x0's rounding times alpha/sigma (~155 at the last
steps), which diffusers' division and multiplication by one float32 alpha often undo
exactly and the fused x0 (scaled by 1/alpha, then multiplied by alpha) does not: measured
up to 4.2x farther from a float64 evaluation than diffusers. A table gives that element
eps straight from x and m (for epsilon prediction, m itself): US*(UX*x + UM*m), scaled
after it cancels as PS is. Where clipping changed x0 (or x0 is NaN) the round-trip form
stays: there x0c is the bound, exact, and the round trip is diffusers' own formula. US = 0
(the default) is a row without this form; known 0 in every row, its bit in absent_terms
spares the comparison.

Why AL, the low part of AM: where alpha is small, x0 = (x - sigma*eps)/alpha cancels
first, and the float32 rounding of AM (sigma, up to half an ulp) times |m| is then divided
by alpha: measured up to 18x farther from a float64 evaluation than diffusers at alpha ~
5e-4 (zero-SNR schedules' first steps, with thresholding), where diffusers' own rounding
of sigma*eps happened to land closer. A table keeps AM's float32 value in AM and the rest
in AL (``coefficients.table.assemble``), so AM*m + AL*m carries AM to about 2**-48 and
x0 is within a few ulps of its float64 value (from the same x and m) however small alpha
is; AL is 0, and left out, wherever AM is a float32 number (sample prediction, flow sigmas).

Why the history enters as differences (d - h1, h1 - h2; h1, h2 the values stored by the
previous steps): multistep solvers weigh them as D1 = (d - h1)/r0 and D2 ~ (D1_0 - D1_1)/(r0
+ r1), where r0 = h0/h is small after a large step in log-SNR (a final jump from sigma ~ 300
to sigma_min: 1/r0 ~ 35). Expanded into weights of d, h1, h2, those are large and opposite,
and the fp32 rounding of each weighted term (~35 times the result) decides the step:
measured up to 20x farther from a float64 evaluation than diffusers, which subtracts
first. A difference of two nearby values is exact or rounded once at its own small size.
A table turns any weights (w0, w1, w2) of (d, h1, h2) into these columns with
``coefficients.table.difference_weights``.

Why OC, the clipped x0 straight into the output: the noise-prediction solvers (dpmsolver,
sde-dpmsolver) store d = eps = (x - alpha*x0)/sigma, and their update adds O0*d to OX*x.
Where alpha is small (cosine schedules at t ~ T) OX and O0*PX are large and nearly opposite:
evaluated as written, the fp32 rounding of two terms ~1e3 times the result decides it. A
table folds them in float64 instead (OX + O0*PX on x, O0*PM on m, O0*P0 on the clipped x0,
O0 = 0) and d is still formed for the history. Without clipping, x0 is linear in x and m and
needs no column of its own (a table folds it into OX and OM), so kernels add OC*x0 only
when clipping: an unclipped x0 can be +-inf (AS = inf on zero-SNR schedules) and 0*inf
would turn a column nobody uses into NaN.
"""

from collections.abc import Mapping

AX, AM, PX, P0, PM, OX, O0, OM, O1, O2, ON, AS, OC, PS, AL, US, UX, UM = range(18)
NUM_COEFFICIENTS = 18

# The columns forming x0 and the history value d: they follow from the prediction type and
# the solver, never from per-call step options such as DDIM's eta.
ESTIMATE_COLUMNS = (AX, AM, AL, AS, PX, P0, PM, PS, US, UX, UM)
# The columns combining the step's terms into its output.
OUTPUT_COLUMNS = (OX, OC, O0, OM, O1, O2, ON)
# The columns that scale a whole sum (x0's, d's), 1 unless a table says otherwise. US is
# not one of them: 0 unless a table says otherwise, and its absent bit means "no such form".
SCALE_COLUMNS = (AS, PS)
# Every column that weighs a term of a sum, and US.
TERM_COLUMNS = tuple(c for c in range(NUM_COEFFICIENTS) if c not in SCALE_COLUMNS)

COLUMN_NAMES = ("ax", "am", "px", "p0", "pm", "ox", "o0", "om", "o1", "o2", "on", "as", "oc", "ps", "al",
                "us", "ux", "um")

CLIP_MODES = ("none", "clamp", "threshold")


class ConstantColumns(Mapping):
    """{column: value} that holds in every row a caller may pass, checked once when made.

    A scheduler builds one per coefficient table (``coefficients.table.constant_columns``)
    and hands it to every step; the check then costs nothing per step.
    """

    __slots__ = ("_values", "get", "absent_terms")

    def __init__(self, values: Mapping = ()):
        checked = {}
        for column, value in dict(values).items():
            if isinstance(column, bool) or not isinstance(column, int) or not 0 <= column < NUM_COEFFICIENTS:
                raise ValueError(f"constant_columns has key {column!r}; expected a column index in [0, {NUM_COEFFICIENTS})")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"constant_columns[{column}] = {value!r}; expected a number")
            checked[column] = float(value)
        self._values = checked
        self.get = checked.get  # looked up per term on the hot path
        self.absent_terms = _absent_terms(checked)  # handed to the kernels per step

    def only(self, columns) -> "ConstantColumns":
        """The part of this hint that concerns ``columns``."""
        return ConstantColumns({c: v for c, v in self._values.items() if c in columns})

    def __getitem__(self, column: int) -> float:
        return self._values[column]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        named = ", ".join(f"{COLUMN_NAMES[c]}={v:g}" for c, v in sorted(self._values.items()))
        return f"ConstantColumns({named})"


def absent_terms(constant_columns) -> int:
    """Bits ``1 << column`` of the terms ``constant_columns`` knows to be 0 in every row.

    Every backend leaves such a term out of its sum instead of adding 0*t: diffusers' formula
    has no such term, and 0*t is not nothing where t is inf or NaN (NaN), nor where the sum
    is -0.0 (-0.0 + 0*t is +0.0). A sum of no terms is -0.0, the identity of addition.
    """
    if not constant_columns:
        return 0
    if type(constant_columns) is ConstantColumns:
        return constant_columns.absent_terms
    return _absent_terms(constant_columns)


def _absent_terms(constant_columns) -> int:
    return sum(1 << c for c in TERM_COLUMNS if constant_columns.get(c) == 0.0)
