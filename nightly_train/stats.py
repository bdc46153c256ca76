"""The promotion gate's statistics, pure: paired one-sided tests, their confidence bounds and their power.

No torch, no numpy, no I/O: every number here can be checked by hand, and `tests/unit/test_gate_stats.py` does.

Sample metrics (reverse KL, forward KL, distinct-2) are compared *per held-out prompt*: both models answer the same
prompts with the same sampling seeds, and the unit of evidence is the prompt (tokens of one answer are not
independent). `sign_flip_test(d, alpha)` tests H0 "mean(d) <= 0" against H1 "mean(d) > 0" over the per-prompt
differences d_i. Under H0's boundary with exchangeable sides (the candidate equal in distribution to the
champion), every d_i is as likely to have either sign, so each of the 2^n sign patterns is equally likely and

    p = #{patterns s : sum_i s_i d_i >= sum_i d_i} / 2^n = #{subsets A : sum_{i in A} d_i <= 0} / 2^n

(flipping the signs of the subset A lowers the sum by 2 sum_A d_i; the empty subset is the observed pattern).
Exact for n <= EXACT_MAX, a seeded Monte Carlo over sign patterns above (p = (1 + hits) / (draws + 1), still a
valid p-value). It is distribution-free, needs no variance estimate, and its smallest p is 2^-n: with fewer
than log2(1 / alpha) prompts (5 at alpha 0.05) nothing can pass, which `min_attainable_p` says up front. Without
exact symmetry (a real, non-zero difference) it is asymptotically valid like a t-test on the mean.
Inverting the test gives the confidence bounds: the hypothesis "mean <= delta" is rejected exactly when delta is
below the K-th smallest subset mean, K = floor(alpha 2^n), so that subset mean is the one-sided (1 - alpha) lower
bound; the upper bound is the mirror image, and together they are a (1 - 2 alpha) interval.

IFEval is paired binary (did prompt i pass strict, for each model): only discordant prompts carry information,
b = champion passes & candidate fails, c = candidate passes & champion fails. The gate asks for
*non-inferiority*: H0 "drop = (P(b) - P(c)) >= margin" against H1 "drop < margin", so a small or noisy set can
never wave a candidate through (it fails to show non-inferiority instead). `paired_noninferiority` uses Tango's
(1998) score test, Z = (b - c - n m) / sqrt(n (2 q + m - m^2)), q the restricted MLE of P(c) on the boundary,
p = Phi(Z); at margin 0 it uses the exact McNemar tail P(X >= c), X ~ Binomial(b + c, 1/2). Its exact size at
the boundary (by enumeration, `noninferiority_rejection_rate`) is 0.048-0.050 at n = 240 and 541 for
discordance 0.1-0.5 (alpha 0.05, margin 0.05). `noninferiority_mde` is the margin that a truly equal
candidate passes with the given power at the observed discordance rate: what the set can and cannot see.

    t = sign_flip_test([0.3, 0.1, -0.05, 0.2, 0.4], alpha=0.05)      # t.p_value == 2/32, t.lower ...
    ni = paired_noninferiority(b=12, c=15, n=240, margin=0.05, alpha=0.05)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

EXACT_MAX = 16  # 2^16 = 65536 sign patterns: exact enumeration stays in the tens of milliseconds
MC_DRAWS = 19_999  # Monte-Carlo sign patterns above EXACT_MAX (p resolution 5e-5)
MC_SEED = 0  # the gate's Monte Carlo is seeded: the same evidence always gives the same verdict
_N = NormalDist()


def normal_cdf(z: float) -> float:
    return _N.cdf(z)


def normal_quantile(p: float) -> float:
    return _N.inv_cdf(p)


# ---------------------------------------------------------------------------------------------- sign flip
@dataclass(frozen=True)
class SignFlipResult:
    """One-sided paired sign-flip (permutation) test of H0 "mean(d) <= 0" and its confidence bounds."""

    n: int
    mean: float  # the statistic: mean of the differences
    sd: float  # sample standard deviation of the differences (for the MDE; NaN when n < 2)
    p_value: float
    lower: float  # one-sided (1 - alpha) lower confidence bound of the mean (-inf when n is too small)
    upper: float  # one-sided (1 - alpha) upper bound; [lower, upper] is a (1 - 2 alpha) interval
    method: str  # "sign-flip exact (2^n patterns)" or "sign-flip Monte Carlo (draws, seed)"
    alpha: float

    @property
    def significant(self) -> bool:
        return self.p_value <= self.alpha


def min_attainable_p(n: int) -> float:
    """The smallest p-value a sign-flip test over n pairs can give (every d_i > 0): 2^-n."""
    return 2.0 ** -n


def _subset_values(d: Sequence[float], *, exact_max: int, draws: int, seed: int) -> tuple[list[tuple[float, int]], int]:
    """(sum, size) of every subset (exact) or of `draws` random subsets, and the p-value's extra count (0 or 1)."""
    n = len(d)
    if n <= exact_max:
        subsets = [(0.0, 0)]
        for x in d:
            subsets += [(s + x, k + 1) for s, k in subsets]
        return subsets, 0
    rng, out = random.Random(seed), []
    for _ in range(draws):
        mask, s, k = rng.getrandbits(n), 0.0, 0
        for i in range(n):
            if mask >> i & 1:
                s, k = s + d[i], k + 1
        out.append((s, k))
    return out, 1  # the observed pattern itself counts once more: p = (1 + hits) / (draws + 1)


def sign_flip_test(d: Sequence[float], alpha: float, *, exact_max: int = EXACT_MAX, draws: int = MC_DRAWS,
                   seed: int = MC_SEED) -> SignFlipResult:
    """Paired, one-sided: is mean(d) > 0? d_i = per-prompt difference, oriented so that positive is better.

    Ties count against H1 (a subset summing to 0 counts as "at least as extreme"), so identical sides give p = 1.
    """
    d = [float(x) for x in d]
    n = len(d)
    if n == 0:
        raise ValueError("sign-flip test on zero pairs")
    if not all(math.isfinite(x) for x in d):
        raise ValueError("sign-flip test on non-finite differences")
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    if sd < 1e-12 * (1.0 + abs(mean)):
        sd = 0.0  # constant differences: float noise is not spread
    subsets, extra = _subset_values(d, exact_max=exact_max, draws=draws, seed=seed)
    denom = len(subsets) + extra
    tol = 1e-12 * (1.0 + sum(abs(x) for x in d))  # float noise of a sum that is 0 in exact arithmetic is a tie
    p = (extra + sum(1 for s, _ in subsets if s <= tol)) / denom
    # "mean <= delta" is rejected iff extra + #{subset means <= delta} <= alpha * denom; empty subsets rank first.
    means = sorted(s / k if k else -math.inf for s, k in subsets)
    j = math.floor(alpha * denom + 1e-9) - extra
    lower = means[j] if 0 <= j < len(means) else -math.inf
    mirrored = sorted(-s / k if k else -math.inf for s, k in subsets)
    upper = -mirrored[j] if 0 <= j < len(mirrored) else math.inf
    method = (f"sign-flip exact (2^{n} patterns)" if not extra
              else f"sign-flip Monte Carlo ({draws} patterns, seed {seed})")
    return SignFlipResult(n, mean, sd, p, lower, upper, method, alpha)


def sign_flip_mde(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """Normal-approximation minimum detectable mean difference: (z_{1-alpha} + z_power) sd / sqrt(n)."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return (normal_quantile(1 - alpha) + normal_quantile(power)) * sd / math.sqrt(n)


# -------------------------------------------------------------------------------------- paired binary
def mcnemar_exact_p(b: int, c: int) -> float:
    """One-sided exact McNemar: P(X >= b) for X ~ Binomial(b + c, 1/2); 1.0 without discordant pairs."""
    n = b + c
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n


def _tango_q(b: float, c: float, n: float, margin: float) -> float:
    """Restricted MLE of P(c-type) when P(b-type) = q + margin: positive root of 2n q^2 + B q + C = 0,
    B = -(b + c) + margin (2n - b + c), C = -c margin (1 - margin)."""
    a2, b1, c0 = 2.0 * n, -(b + c) + margin * (2 * n - b + c), -c * margin * (1.0 - margin)
    return (-b1 + math.sqrt(max(b1 * b1 - 4.0 * a2 * c0, 0.0))) / (2.0 * a2)


def tango_score_p(b: int, c: int, n: int, margin: float) -> tuple[float, float]:
    """(Z, upper-tail p) of Tango's score test of H0 "(b - c)/n <= margin" for paired binary outcomes, margin >= 0."""
    q = _tango_q(b, c, n, margin)
    var = n * (2.0 * q + margin - margin * margin)
    if var <= 0.0:  # margin 0 and no discordant pair: no evidence of any difference
        return 0.0, 1.0
    z = (b - c - n * margin) / math.sqrt(var)
    return z, 0.5 * math.erfc(z / math.sqrt(2.0))


def noninferiority_z_p(b: int, c: int, n: int, margin: float) -> tuple[float, float]:
    """(Z, p) of Tango's score test of H0 "drop = (b - c)/n >= margin", any margin in (-1, 1): small p = the drop
    is below the margin. A negative margin asks for an improvement of at least -margin (b and c swap roles)."""
    if margin >= 0.0:
        q = _tango_q(b, c, n, margin)
        var = n * (2.0 * q + margin - margin * margin)
        if var <= 0.0:  # margin 0 and no discordant pair
            return 0.0, 1.0
        z = (b - c - n * margin) / math.sqrt(var)
        return z, normal_cdf(z)
    z, upper = tango_score_p(c, b, n, -margin)
    return -z, upper


@dataclass(frozen=True)
class NonInferiorityTest:
    """Paired IFEval non-inferiority: H0 "the candidate's prompt-level strict accuracy is lower by >= margin"."""

    n: int
    regressions: int  # b: champion passed, candidate failed
    improvements: int  # c: candidate passed, champion failed
    margin: float
    z: float
    p_value: float
    upper: float  # one-sided (1 - alpha) upper confidence bound of the drop (Tango score inverted)
    lower: float  # one-sided (1 - alpha) lower bound of the drop; [lower, upper] is a (1 - 2 alpha) interval
    mde: float  # margin a truly equal candidate passes with 80% power at this n, discordance and alpha
    power_at_margin: float  # power of this test for a truly equal candidate at the configured margin
    method: str
    alpha: float

    @property
    def drop(self) -> float:
        return (self.regressions - self.improvements) / self.n

    @property
    def discordance(self) -> float:
        return (self.regressions + self.improvements) / self.n

    @property
    def passed(self) -> bool:
        return self.p_value <= self.alpha


def _drop_upper_bound(b: int, c: int, n: int, alpha: float) -> float:
    """Smallest margin m in (-1, 1) whose non-inferiority test rejects at alpha (bisection; p falls as m grows)."""
    lo, hi = -1.0 + 1e-9, 1.0 - 1e-9
    if noninferiority_z_p(b, c, n, hi)[1] > alpha:
        return 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if noninferiority_z_p(b, c, n, mid)[1] <= alpha else (mid, hi)
    return hi


def equal_candidate_power(n: int, discordance: float, margin: float, alpha: float) -> float:
    """Normal approximation of P(pass) for a truly equal candidate (P(b) = P(c) = discordance / 2)."""
    if margin <= 0.0:
        return alpha
    psi = min(max(discordance, 0.0), 1.0)
    q = _tango_q(n * psi / 2, n * psi / 2, n, margin)  # the restricted MLE at the expected counts
    null_sd = math.sqrt(n * (2.0 * q + margin - margin * margin))
    gap = n * margin - normal_quantile(1 - alpha) * null_sd  # the test passes iff b - c <= gap
    if psi == 0.0:
        return 1.0 if gap >= 0 else 0.0
    return normal_cdf(gap / math.sqrt(n * psi))


def noninferiority_mde(n: int, discordance: float, alpha: float, power: float = 0.8) -> float:
    """The margin a truly equal candidate passes with `power` (bisection on `equal_candidate_power`)."""
    lo, hi = 0.0, 1.0 - 1e-9
    if equal_candidate_power(n, discordance, hi, alpha) < power:
        return 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if equal_candidate_power(n, discordance, mid, alpha) < power else (lo, mid)
    return hi


def paired_noninferiority(b: int, c: int, n: int, *, margin: float, alpha: float, power: float = 0.8
                          ) -> NonInferiorityTest:
    """Non-inferiority of paired binary outcomes (b regressions, c improvements among n prompts)."""
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"paired counts b={b} c={c} n={n} are impossible")
    if margin == 0.0:
        z, p, method = noninferiority_z_p(b, c, n, 0.0)[0], mcnemar_exact_p(c, b), "exact-mcnemar (margin 0)"
    else:
        (z, p), method = noninferiority_z_p(b, c, n, margin), "tango-score"
    psi = (b + c) / n
    upper, lower = _drop_upper_bound(b, c, n, alpha), -_drop_upper_bound(c, b, n, alpha)
    return NonInferiorityTest(n, b, c, margin, z, p, upper, lower, noninferiority_mde(n, psi, alpha, power),
                              equal_candidate_power(n, psi, margin, alpha), method, alpha)


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
            + (n - k) * math.log1p(-p))


def noninferiority_rejection_rate(n: int, p_b: float, p_c: float, margin: float, alpha: float) -> float:
    """Exact P(the non-inferiority test passes) when each prompt is a regression with probability p_b and an
    improvement with p_c (trinomial, enumerated): the size at the H0 boundary (p_b - p_c = margin), the power
    elsewhere. Terms below e^-40 are skipped."""
    psi, total = p_b + p_c, 0.0
    for k in range(n + 1):
        lk = _log_binom_pmf(k, n, psi)
        if lk < -40:
            continue
        for b in range(k + 1):
            lb = _log_binom_pmf(b, k, p_b / psi if psi > 0 else 0.5)
            if lb < -40:
                continue
            p = mcnemar_exact_p(k - b, b) if margin == 0.0 else noninferiority_z_p(b, k - b, n, margin)[1]
            if p <= alpha:
                total += math.exp(lk + lb)
    return total
