"""Each method of docs/methods.md written out from its paper's formula in float64 against the
fk call the page gives, with the convention that differs stated (mixture weight, cross-entropy vs
KL, T^2, a plan of mass N vs 1, the f-DPO alpha). Small shapes, every backend that runs float64."""

import math

import pytest
import torch
import torch.nn.functional as F

import fdiv_kernels as fk
from helpers import available_backends
from reference import logits

F64 = torch.float64
# float64 runs on the torch and cpu backends (Triton computes in fp32).
BACKENDS = [b for b in available_backends("divergence_fwd") if b in ("torch", "cpu")]
T = 2.0


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _inputs(rows=7, v=37, seed=3):
    # V = 37: an odd size inside one block; rows 2 and 5 ignored below.
    s = logits((rows, v), F64, seed=seed)
    t = logits((rows, v), F64, seed=seed + 1)
    return s, t, torch.softmax(t / T, -1), torch.softmax(s / T, -1)


def _close(a, b, rtol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)


def _row(s, t, kind, backend, **kw):
    return fk.divergence(s, t, kind, temperature=T, reduction="none", backend=backend, **kw)


def test_hinton_kd_is_t_squared_times_kl(backend):
    s, t, p, q = _inputs()
    ours = T**2 * fk.divergence(s, t, "kl", temperature=T, backend=backend)
    ref = T**2 * F.kl_div(torch.log_softmax(s / T, -1), p, reduction="batchmean")
    _close(ours, ref)


@pytest.mark.parametrize("beta", [0.3, 0.9])
def test_gkd_generalized_jsd_beta_weights_the_teacher(backend, beta):
    s, t, p, q = _inputs()
    m = beta * p + (1 - beta) * q

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)

    _close(_row(s, t, "js", backend, beta=beta), beta * kl(p, m) + (1 - beta) * kl(q, m))
    # A code mixing the student by beta: m' = beta q + (1 - beta) p is fk's beta' = 1 - beta.
    m2 = beta * q + (1 - beta) * p
    _close(_row(s, t, "js", backend, beta=1 - beta), (1 - beta) * kl(p, m2) + beta * kl(q, m2))


def test_distillm_skew_kls_and_its_forward_kl_is_cross_entropy(backend):
    s, t, p, q = _inputs()
    a = 0.1
    _close(_row(s, t, "skew_kl", backend, lam=a), (p * (p / (a * p + (1 - a) * q)).log()).sum(-1))
    _close(_row(s, t, "skew_reverse_kl", backend, lam=a),
           (q * (q / (a * q + (1 - a) * p)).log()).sum(-1))
    ce = -(p * q.log()).sum(-1)                       # DistiLLM's / torchtune's "forward KL"
    _close(_row(s, t, "soft_ce", backend), ce)
    _close(_row(s, t, "soft_ce", backend) - _row(s, t, "kl", backend), -(p * p.log()).sum(-1))


def test_f_distill_token_level_divergences(backend):
    s, t, p, q = _inputs()
    m = (p + q) / 2
    _close(_row(s, t, "kl", backend), (p * (p / q).log()).sum(-1))
    _close(_row(s, t, "reverse_kl", backend), (q * (q / p).log()).sum(-1))
    _close(_row(s, t, "js", backend, beta=0.5),
           0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1))
    _close(_row(s, t, "tv", backend), 0.5 * (p - q).abs().sum(-1))


def test_alphanet_max_of_two_alpha_divergences(backend):
    s, t, p, q = _inputs()

    def d_alpha(a):  # AlphaNet's D_alpha(p || q) = sum q ((p/q)^a - 1) / (a (a - 1))
        return (q * ((p / q) ** a - 1)).sum(-1) / (a * (a - 1))

    ours = torch.maximum(_row(s, t, "alpha", backend, alpha=-1.0),
                         _row(s, t, "alpha", backend, alpha=1.5))
    _close(ours, torch.maximum(d_alpha(-1.0), d_alpha(1.5)))


def test_cauchy_schwarz(backend):
    s, t, p, q = _inputs()
    ref = -(p * q).sum(-1).log() + 0.5 * (p * p).sum(-1).log() + 0.5 * (q * q).sum(-1).log()
    _close(_row(s, t, "cauchy_schwarz", backend), ref)


def test_minillm_and_bdkd_pieces_with_ignored_rows(backend):
    s, t, p, q = _inputs()
    labels = torch.arange(7) % 5
    labels[[2, 5]] = -100
    keep = labels != -100
    rkl = fk.divergence(s, t, "reverse_kl", temperature=T, labels=labels, backend=backend)
    _close(rkl, (q * (q / p).log()).sum(-1)[keep].mean())
    _close(fk.entropy(t, temperature=T, backend=backend), -(p * p.log()).sum(-1))


def _sinkd_loop(s, t, eps, n_iter, log_w):
    """SinKD written out: L1 cost between softened rows, log-domain updates with marginal log
    weights ``log_w`` (-log N: mass 1; 0: marginals of ones, mass N), loss <C, P>."""
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    C = (ps[:, None] - pt[None]).abs().sum(-1)
    lw = torch.full((C.shape[0],), log_w, dtype=C.dtype)
    f, g = torch.zeros_like(lw), torch.zeros_like(lw)
    for _ in range(n_iter):
        f = -eps * torch.logsumexp(lw[None] + (g[None] - C) / eps, -1)
        g = -eps * torch.logsumexp(lw[:, None] + (f[:, None] - C) / eps, 0)
    return (torch.exp(lw[:, None] + lw[None] + (f[:, None] + g[None] - C) / eps) * C).sum()


def test_sinkd_plan_of_mass_one_is_a_mass_n_code_over_n():
    n = 12
    s, t = logits((n, 5), F64, seed=8), logits((n, 5), F64, seed=9)
    ours = fk.nn.SinkhornDistillationLoss(temperature=T, epsilon=0.1, n_iter=20)(s, t)
    _close(ours, _sinkd_loop(s, t, 0.1, 20, -math.log(n)))
    _close(n * ours, _sinkd_loop(s, t, 0.1, 20, 0.0))


@pytest.mark.parametrize("a_paper", [0.3, 0.7])
def test_fdpo_alpha_is_one_minus_the_papers(a_paper):
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (torch.randn(9, dtype=F64, generator=g) for _ in range(4))
    beta = 0.1
    ours = fk.losses.fdpo_loss(pc, pr, rc, rr, divergence="alpha", beta=beta, alpha=1 - a_paper)

    def f_prime(d):  # the paper's alpha-divergence: f'(u) = (1 - u^-alpha) / alpha, d = log u
        return (1 - torch.exp(-a_paper * d)) / a_paper

    ref = -F.logsigmoid(beta * (f_prime(pc - rc) - f_prime(pr - rr))).mean()
    _close(ours, ref, rtol=1e-7)  # fdpo_loss takes the alpha exponential in fp32, as TRL does
    # js: f'(u) = log(2u / (1 + u)); reverse_kl: log u (DPO).
    js = -F.logsigmoid(beta * (math.log(2) + F.logsigmoid(pc - rc) - F.logsigmoid(pr - rr)
                               - math.log(2))).mean()
    _close(fk.losses.fdpo_loss(pc, pr, rc, rr, divergence="js", beta=beta), js)
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    _close(fk.losses.fdpo_loss(pc, pr, rc, rr, divergence="reverse_kl", beta=beta), dpo)


def test_sequencematch_chi2_from_logits_as_q_values(backend):
    # SequenceMatch-chi2 (IQ-Learn's chi2 objective with the logits as Q): Q(s, a) = raw logit
    # of the taken token, V(s) = log sum_a exp Q(s, a) (fk.logsumexp), V = 0 after the last
    # position, implicit reward r = Q(s, a) - gamma V(s'), phi(r) = r - r^2 / (4 alpha); loss =
    # -mean_data phi(r) + mean_mix (V(s) - gamma V(s')).
    gamma, a = 0.98, 0.5
    data, mix = logits((2, 6, 11), F64, seed=11), logits((3, 6, 11), F64, seed=12)
    g = torch.Generator().manual_seed(13)
    tokens = torch.randint(0, 11, (2, 6), generator=g)

    def v_next(v):  # V(s') per position, 0 at the end of the sequence
        return torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)

    v_d = fk.logsumexp(data, -1, backend=backend)
    v_m = fk.logsumexp(mix, -1, backend=backend)
    r = data.gather(-1, tokens[..., None])[..., 0] - gamma * v_next(v_d)
    ours = -(r - r**2 / (4 * a)).mean() + (v_m - gamma * v_next(v_m)).mean()

    v_d64, v_m64 = data.exp().sum(-1).log(), mix.exp().sum(-1).log()  # written out
    q_sa = torch.stack([data[b, i, tokens[b, i]] for b in range(2) for i in range(6)])
    r64 = q_sa.reshape(2, 6) - gamma * v_next(v_d64)
    _close(ours, -(r64 - r64**2 / (4 * a)).mean() + (v_m64 - gamma * v_next(v_m64)).mean())
    # The reward is not log pi: r = log pi(a|s) + V(s) - gamma V(s').
    lp = fk.token_logprobs(data, tokens, backend=backend)
    _close(r, lp + v_d - gamma * v_next(v_d))


def test_contrastive_decoding_js_between_expert_and_amateurs(backend):
    # DoLa: the premature (amateur) layer is the one whose next-token distribution is furthest
    # from the final (expert) layer's in JSD = 1/2 KL(p||m) + 1/2 KL(q||m), m = (p + q) / 2.
    expert = logits((4, 29), F64, seed=21)
    amateurs = logits((3, 4, 29), F64, seed=22)      # 3 candidate layers, 4 positions
    ours = torch.stack([fk.divergence(a, expert, "js", beta=0.5, reduction="none",
                                      backend=backend) for a in amateurs])
    p, qs = torch.softmax(expert, -1), torch.softmax(amateurs, -1)
    m = (p + qs) / 2
    ref = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (qs * (qs / m).log()).sum(-1)
    _close(ours, ref)
    # DoLa's code: F.kl_div(log x, m) is KL(m||x), then a mean over the vocabulary.
    dola_code = 0.5 * ((m * (m / p).log()).mean(-1) + (m * (m / qs).log()).mean(-1))
    assert not torch.allclose(ours / 29, dola_code)
    # The contrast: log p - log q_j of each position's chosen layer, from per-row lse.
    j = ours.argmax(0)
    amateur = amateurs[j, torch.arange(4)]
    score = ((expert - fk.logsumexp(expert, -1, backend=backend)[:, None])
             - (amateur - fk.logsumexp(amateur, -1, backend=backend)[:, None]))
    _close(score, p.log() - qs[j, torch.arange(4)].log())


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_label_dro_kl_is_temperature_scaled_ce(backend, margin):
    # LDR-KL (Zhu, Ying & Yang, ICML 2023): max over label weights w in the simplex of
    # sum_k w_k (c [k != y] + f_k - f_y) - lam KL(w || uniform)
    #   = lam log (1/K sum_k exp((c [k != y] + f_k - f_y) / lam)).
    lam, k = 0.7, 13
    f = logits((6, k), F64, seed=31)
    y = torch.tensor([0, 3, 12, 5, 7, 3])
    shifted = f + margin * (1 - F.one_hot(y, k).to(F64))
    ours = -lam * fk.token_logprobs(shifted, y, temperature=lam, backend=backend) \
        - lam * math.log(k)
    delta = margin * (torch.arange(k)[None] != y[:, None]).to(F64)
    ref = lam * ((delta + f - f.gather(1, y[:, None])) / lam).exp().mean(-1).log()
    _close(ours, ref)
    # The worst-case weights are softmax((c [k != y] + f) / lam).
    w = torch.softmax(shifted / lam, -1)
    obj = (w * (delta + f - f.gather(1, y[:, None]))).sum(-1) - lam * (w * (w * k).log()).sum(-1)
    _close(obj, ref)
