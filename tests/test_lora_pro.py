"""lrjax.optim.lora_pro: LoRA-Pro (efficient/full), LoRA-FA and Riemannian LoRA as optax transformations.

References: float64 NumPy transcriptions of the official LoRA-Pro rules written in the papers'
(torch) orientation ``W_t = K^T``, ``A_t = A^T``, ``B_t = B^T``; PEFT's ``create_lorafa_optimizer``
and ``create_riemannian_optimizer`` on a tiny torch ``nn.Linear``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import lrjax
from lrjax.optim.lora_pro import (LoRAProState, lora_fa, lora_pro, lora_pro_adjust, riemannian_lora,
                                  scale_by_lora_fa, scale_by_lora_pro, scale_by_riemannian_lora,
                                  solve_sylvester_psd)
from lrjax.reparam.dora import DoRA

f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731


# ----------------------------------------------------------------- float64 NumPy transcriptions
def np_pinv(m, eps=1e-8):
    return np.linalg.pinv(m + eps * np.eye(len(m)))


def np_adjust_torch(At, Bt, gAt, gBt, s, x_mode):
    """The official rule (mrflogs/LoRA-Pro peta/optim_efficient_adamw_only.py), torch orientation."""
    SA, SB = At @ At.T, Bt.T @ Bt
    iA, iB = np_pinv(SA), np_pinv(SB)
    if x_mode == "sylvester":
        X = scipy.linalg.solve_sylvester(SB, SA, -(1 / s**2) * iB @ gAt @ At.T)
    elif x_mode == "symmetry":
        X = -0.5 * (1 / s**2) * iB @ Bt.T @ gBt @ SA
    else:
        X = np.zeros((len(SA), len(SA)))
    gA = (1 / s**2) * iB @ gAt + X @ At
    gB = (1 / s**2) * (np.eye(len(Bt)) - Bt @ iB @ Bt.T) @ gBt @ iA - Bt @ X
    return gA, gB, X


def problem(seed=0, M=7, N=5, r=3, b_zero=False):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(M, r)) / np.sqrt(M)
    B = np.zeros((r, N)) if b_zero else rng.normal(size=(r, N))
    G = rng.normal(size=(M, N))
    return A, B, G


# ----------------------------------------------------------------- (1) equivalent gradient identity
@pytest.mark.parametrize("x_mode", ["sylvester", "symmetry", "zero"])
def test_equivalent_gradient_is_projection_of_G_for_every_X(x_mode):
    s = 2.0
    A, B, G = problem(1)
    ga, gb = s * G @ B.T, s * A.T @ G                       # lrjax: g_A = s G B^T, g_B = s A^T G
    out = lora_pro_adjust(f32(A), f32(B), f32(ga), f32(gb), s, x_mode=x_mode)
    eq = s * (np.asarray(out.a, np.float64) @ B + A @ np.asarray(out.b, np.float64))
    # lrjax: G P_B + P_A G (I - P_B); torch: P_Bt G_t + (I - P_Bt) G_t P_At (transposed)
    PA = A @ np.linalg.inv(A.T @ A) @ A.T
    PB = B.T @ np.linalg.inv(B @ B.T) @ B
    ref = G @ PB + PA @ G @ (np.eye(5) - PB)
    Gt, At, Bt = G.T, A.T, B.T
    PAt, PBt = At.T @ np.linalg.inv(At @ At.T) @ At, Bt @ np.linalg.inv(Bt.T @ Bt) @ Bt.T
    np.testing.assert_allclose(ref, (PBt @ Gt + (np.eye(5) - PBt) @ Gt @ PAt).T, atol=1e-12)
    np.testing.assert_allclose(eq, ref, atol=2e-5)
    # orthogonal projection onto the tangent space {A Y + Z B}: the residual is orthogonal to it
    res = G - eq
    assert np.abs(A.T @ res).max() < 2e-5 and np.abs(res @ B.T).max() < 2e-5
    # the adjusted gradients themselves match the official rule (transposed)
    gA, gB, X = np_adjust_torch(At, Bt, ga.T, gb.T, s, x_mode)
    np.testing.assert_allclose(np.asarray(out.a), gA.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.b), gB.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.x), X.T, rtol=1e-4, atol=1e-5)


def test_x_modes_differ_but_equivalent_gradients_agree():
    s = 1.5
    A, B, G = problem(2)
    args = (f32(A), f32(B), f32(s * G @ B.T), f32(s * A.T @ G), s)
    outs = {m: lora_pro_adjust(*args, x_mode=m) for m in ("sylvester", "symmetry", "zero")}
    eqs = {m: s * (o.a @ f32(B) + f32(A) @ o.b) for m, o in outs.items()}
    assert float(jnp.abs(outs["sylvester"].x - outs["symmetry"].x).max()) > 1e-2
    assert float(jnp.abs(outs["sylvester"].x).max()) > 1e-2
    for m in ("symmetry", "zero"):
        np.testing.assert_allclose(eqs[m], eqs["sylvester"], atol=2e-5)


# ----------------------------------------------------------------- (2) Sylvester solve and optimality
def test_sylvester_residual_and_optimal_x():
    s = 2.0
    A, B, G = problem(3, M=9, N=6, r=4)
    ga, gb = s * G @ B.T, s * A.T @ G
    out = lora_pro_adjust(f32(A), f32(B), f32(ga), f32(gb), s)
    X = np.asarray(out.x, np.float64)
    SA, SB = A.T @ A, B @ B.T
    C = -(1 / s**2) * A.T @ ga @ np.linalg.inv(SB)
    assert np.abs(SA @ X + X @ SB - C).max() < 1e-5 * np.abs(C).max()
    np.testing.assert_allclose(X, scipy.linalg.solve_sylvester(SA, SB, C), rtol=1e-4, atol=1e-6)

    def cost(X):   # ||g~_A - g_A||^2 + ||g~_B - g_B||^2 as a function of X (float64)
        gA_hat = (1 / s**2) * ga @ np.linalg.inv(SB) + A @ X
        PB = B.T @ np.linalg.inv(SB) @ B
        gB_hat = (1 / s**2) * np.linalg.inv(SA) @ gb @ (np.eye(6) - PB) - X @ B
        return np.sum((gA_hat - ga) ** 2) + np.sum((gB_hat - gb) ** 2)

    best = cost(X)
    sym = np.asarray(lora_pro_adjust(f32(A), f32(B), f32(ga), f32(gb), s, x_mode="symmetry").x, np.float64)
    assert best < cost(sym) - 1e-3 and best < cost(np.zeros_like(X)) - 1e-3
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert best <= cost(X + 1e-2 * rng.normal(size=X.shape)) + 1e-9


def test_solve_sylvester_psd_batched_and_singular():
    rng = np.random.default_rng(4)
    p = rng.normal(size=(2, 3, 3)); p = p @ np.swapaxes(p, -1, -2)
    q = rng.normal(size=(2, 4, 4)); q = q @ np.swapaxes(q, -1, -2)
    c = rng.normal(size=(2, 3, 4))
    x = np.asarray(jax.jit(solve_sylvester_psd)(f32(p), f32(q), f32(c)))
    for i in range(2):
        np.testing.assert_allclose(x[i], scipy.linalg.solve_sylvester(p[i], q[i], c[i]), rtol=1e-3, atol=1e-4)
    # P = Q = 0: the minimum-norm solution is 0, not NaN
    z = solve_sylvester_psd(jnp.zeros((3, 3)), jnp.zeros((2, 2)), f32(rng.normal(size=(3, 2))))
    assert bool(jnp.all(z == 0))


# ----------------------------------------------------------------- (3) first steps vs the official rule
def _np_train(A, B, K, Xd, Y, s, lr, steps, *, variant, x_mode="sylvester", wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
    """float64 NumPy transcription in torch orientation: the official efficient AdamW (weight decay
    before the step) or the full variant (Adam on the equivalent gradient, SGD on the output)."""
    At, Bt = A.T.copy(), B.T.copy()
    mA, vA, mB, vB = (np.zeros_like(At), np.zeros_like(At), np.zeros_like(Bt), np.zeros_like(Bt))
    m = v = np.zeros((Bt.shape[0], At.shape[1]))
    out = []
    for t in range(1, steps + 1):
        Keff = K + s * At.T @ Bt.T
        Gt = (Xd.T @ (Xd @ Keff - Y)).T / len(Xd)           # dL/dW_t for L = 0.5 mean ||X K - Y||^2
        gAt, gBt = s * Bt.T @ Gt, s * Gt @ At.T
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if variant == "efficient":
            gA, gB, _ = np_adjust_torch(At, Bt, gAt, gBt, s, x_mode)
            mA = b1 * mA + (1 - b1) * gA; vA = b2 * vA + (1 - b2) * gA**2
            mB = b1 * mB + (1 - b1) * gB; vB = b2 * vB + (1 - b2) * gB**2
            At = At * (1 - wd * lr) - lr * (mA / bc1) / (np.sqrt(vA) / np.sqrt(bc2) + eps)
            Bt = Bt * (1 - wd * lr) - lr * (mB / bc1) / (np.sqrt(vB) / np.sqrt(bc2) + eps)
        else:
            gA0, gB0, _ = np_adjust_torch(At, Bt, gAt, gBt, s, "zero")
            Gh = s * (Bt @ gA0 + gB0 @ At)
            m = b1 * m + (1 - b1) * Gh; v = b2 * v + (1 - b2) * Gh**2
            U = (m / bc1) / (np.sqrt(v / bc2) + eps)
            gA, gB, _ = np_adjust_torch(At, Bt, s * Bt.T @ U, s * U @ At.T, s, x_mode)
            At, Bt = At - lr * gA, Bt - lr * gB
        out.append((At.T.copy(), Bt.T.copy()))
    return out


def _jax_train(opt, rp, A, B, K, Xd, Y, steps):
    base = {"lin": {"kernel": f32(K)}}
    ad = {"lin/kernel": {"a": f32(A), "b": f32(B)}}

    def loss(ad):
        k = rp.materialize(base, ad)["lin"]["kernel"]
        return 0.5 * jnp.mean(jnp.sum((f32(Xd) @ k - f32(Y)) ** 2, axis=-1))

    @jax.jit
    def step(ad, st):
        g = jax.grad(loss)(ad)
        u, st = opt.update(g, st, ad)
        return optax.apply_updates(ad, u), st

    st, out = opt.init(ad), []
    for _ in range(steps):
        ad, st = step(ad, st)
        out.append((np.asarray(ad["lin/kernel"]["a"]), np.asarray(ad["lin/kernel"]["b"])))
    return out


@pytest.mark.parametrize("variant,x_mode,wd", [("efficient", "sylvester", 0.0), ("efficient", "symmetry", 0.1),
                                               ("efficient", "zero", 0.0), ("full", "sylvester", 0.0)])
def test_first_steps_match_official_rule(variant, x_mode, wd):
    rng = np.random.default_rng(5)
    M, N, r, lr = 6, 5, 2, 1e-2
    rp = lrjax.LoRA(rank=r, alpha=4.0)                       # s = 2 (the official 16 / 8)
    A = rng.uniform(-1, 1, size=(M, r)) / np.sqrt(M)
    B = np.zeros((r, N))                                     # LoRA init: the B = 0 first step is exercised
    K, Xd = rng.normal(size=(M, N)), rng.normal(size=(16, M))
    Y = rng.normal(size=(16, N))
    steps = 4
    ref = _np_train(A, B, K, Xd, Y, rp.scale, lr, steps, variant=variant, x_mode=x_mode, wd=wd)
    got = _jax_train(lora_pro(lr, rp, variant=variant, x_mode=x_mode, weight_decay=wd), rp, A, B, K, Xd, Y, steps)
    for (ra, rb), (ja, jb) in zip(ref, got):
        np.testing.assert_allclose(ja, ra, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(jb, rb, rtol=1e-4, atol=1e-6)
    assert np.abs(got[-1][0] - A).max() > 1e-3                # A moved after the first step


def test_b_zero_first_update_is_the_step0_rule():
    s, lr = 2.0, 1e-2
    A, _, G = problem(6)
    rp = lrjax.LoRA(rank=3, alpha=6.0)
    ad = {"k": {"a": f32(A), "b": jnp.zeros((3, 5))}}
    g = {"k": {"a": jnp.zeros((7, 3)), "b": f32(s * A.T @ G)}}
    adj = lora_pro_adjust(ad["k"]["a"], ad["k"]["b"], g["k"]["a"], g["k"]["b"], s)
    np.testing.assert_allclose(adj.a, 0.0, atol=0)
    np.testing.assert_allclose(adj.b, (1 / s**2) * np.linalg.inv(A.T @ A) @ (s * A.T @ G), rtol=1e-4, atol=1e-5)
    u, _ = lora_pro(lr, rp).update(g, lora_pro(lr, rp).init(ad), ad)
    assert bool(jnp.all(u["k"]["a"] == 0))
    np.testing.assert_allclose(u["k"]["b"], -lr * np.sign(np.asarray(adj.b)), rtol=1e-5)


# ----------------------------------------------------------------- (4) LoRA-FA vs PEFT, (5) Riemannian vs PEFT
def _peft_setup(seed, rslora=False, r=2, alpha=4):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(x)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"],
                                                       use_rslora=rslora))
    lin = model.base_model.model.lin
    rng = np.random.default_rng(seed)
    At = rng.normal(size=(r, 6)).astype(np.float32) * 0.5
    Bt = rng.normal(size=(5, r)).astype(np.float32) * 0.5     # nonzero B: the general case
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(torch.from_numpy(At))
        lin.lora_B["default"].weight.copy_(torch.from_numpy(Bt))
    x = rng.normal(size=(8, 6)).astype(np.float32)
    y = rng.normal(size=(8, 5)).astype(np.float32)
    W = lin.base_layer.weight.detach().numpy().copy()
    bias = lin.base_layer.bias.detach().numpy().copy()
    rp = (lrjax.RSLoRA if rslora else lrjax.LoRA)(rank=r, alpha=float(alpha), targets="lin/kernel")
    base = {"lin": {"kernel": f32(W.T), "bias": f32(bias)}}
    ad = {"lin/kernel": {"a": f32(At.T), "b": f32(Bt.T)}}

    def torch_steps(opt, steps):
        out = []
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(steps):
            opt.zero_grad()
            ((model(xt) - yt) ** 2).mean().backward()
            opt.step()
            out.append((lin.lora_A["default"].weight.detach().numpy().T.copy(),
                        lin.lora_B["default"].weight.detach().numpy().T.copy()))
        return out

    def jax_steps(opt, steps):
        def loss(ad):
            p = rp.materialize(base, ad)["lin"]
            return jnp.mean((f32(x) @ p["kernel"] + p["bias"] - f32(y)) ** 2)
        a, st, out = ad, opt.init(ad), []
        for _ in range(steps):
            u, st = opt.update(jax.grad(loss)(a), st, a)
            a = optax.apply_updates(a, u)
            out.append((np.asarray(a["lin/kernel"]["a"]), np.asarray(a["lin/kernel"]["b"])))
        return out

    return model, rp, torch_steps, jax_steps


@pytest.mark.reference
@pytest.mark.parametrize("rslora,wd,eps", [(False, 0.1, 1e-3), (True, 0.0, None)])
def test_lora_fa_matches_peft(monkeypatch, rslora, wd, eps):
    """eps=1e-3 (set on PEFT's param group) is large enough to tell the HF placement
    ``m / (sqrt(v) + eps)`` from torch's ``m_hat / (sqrt(v_hat) + eps)``; None = PEFT's 1e-6."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.optimizers import create_lorafa_optimizer
    import peft.optimizers.lorafa as lorafa_mod
    monkeypatch.setattr(lorafa_mod, "is_bf16_available", lambda *a, **k: False)   # float32 math, as lrjax
    model, rp, torch_steps, jax_steps = _peft_setup(7, rslora)
    lr = 1e-2
    topt = create_lorafa_optimizer(model, r=2, lora_alpha=4, lr=lr, weight_decay=wd)
    if eps is not None:
        topt.param_groups[0]["eps"] = eps
    ref = torch_steps(topt, 4)
    got = jax_steps(lora_fa(lr, rp, weight_decay=wd, **({} if eps is None else {"eps": eps})), 4)
    a0 = got[0][0]
    for (ra, rb), (ja, jb) in zip(ref, got):
        np.testing.assert_array_equal(ja, a0)                 # A frozen
        np.testing.assert_allclose(ja, ra, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(jb, rb, rtol=2e-5, atol=1e-6)
    assert np.abs(got[-1][1] - got[0][1]).max() > 1e-3


@pytest.mark.reference
@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_riemannian_matches_peft(inner):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.optimizers import create_riemannian_optimizer
    model, rp, torch_steps, jax_steps = _peft_setup(8)
    lr = 1e-2 if inner == "adamw" else 5e-2
    if inner == "adamw":
        topt = create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, reg=1e-2, weight_decay=0.1, eps=1e-3)
        jopt = riemannian_lora(lr, rp, reg=1e-2, weight_decay=0.1, eps=1e-3)   # eps large enough to matter
    else:
        topt = create_riemannian_optimizer(model, torch.optim.SGD, lr=lr, reg=1e-2)
        jopt = optax.chain(scale_by_riemannian_lora(rp, reg=1e-2), optax.sgd(lr))
    ref, got = torch_steps(topt, 4), jax_steps(jopt, 4)
    for (ra, rb), (ja, jb) in zip(ref, got):
        np.testing.assert_allclose(ja, ra, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(jb, rb, rtol=2e-5, atol=1e-6)


def test_riemannian_preconditioner_formula():
    A, B, G = problem(9)
    rp = lrjax.LoRA(rank=3)
    ad, g = {"k": {"a": f32(A), "b": f32(B)}}, {"k": {"a": f32(G @ B.T), "b": f32(A.T @ G)}}
    t = scale_by_riemannian_lora(rp, reg=0.05)
    u, _ = t.update(g, t.init(ad), ad)
    np.testing.assert_allclose(u["k"]["a"], G @ B.T @ np.linalg.inv(B @ B.T + 0.05 * np.eye(3)), rtol=1e-4)
    np.testing.assert_allclose(u["k"]["b"], np.linalg.inv(A.T @ A + 0.05 * np.eye(3)) @ A.T @ G, rtol=1e-4)


# ----------------------------------------------------------------- (6) jit, bfloat16, batched, degenerate
ALL = {
    "pro": lambda rp: lora_pro(1e-2, rp),
    "pro_full_sym": lambda rp: lora_pro(optax.linear_schedule(1e-2, 1e-3, 5), rp, variant="full", x_mode="symmetry"),
    "fa": lambda rp: lora_fa(1e-2, rp, weight_decay=0.1),
    "riem": lambda rp: riemannian_lora(1e-2, rp),
}


def _two_updates(opt, ad, g):
    st = opt.init(ad)
    u1, st = opt.update(g, st, ad)
    u2, st = opt.update(g, st, optax.apply_updates(ad, u1))
    return u1, u2


@pytest.mark.parametrize("name", sorted(ALL))
def test_jit_batched_and_bfloat16(name):
    rng = np.random.default_rng(10)
    L, M, N, r = 3, 6, 5, 2
    rp = lrjax.LoRA(rank=r, alpha=4.0)
    A, B, G = rng.normal(size=(L, M, r)), rng.normal(size=(L, r, N)), rng.normal(size=(L, M, N))
    ga, gb = 2.0 * G @ np.swapaxes(B, -1, -2), 2.0 * np.swapaxes(A, -1, -2) @ G
    ad = {"blk/kernel": {"a": f32(A), "b": f32(B)}}
    g = {"blk/kernel": {"a": f32(ga), "b": f32(gb)}}
    opt = ALL[name](rp)
    eager = _two_updates(opt, ad, g)
    jitted = jax.jit(lambda ad, g: _two_updates(opt, ad, g))(ad, g)
    sliced = _two_updates(opt, {f"s{i}": {"a": f32(A[i]), "b": f32(B[i])} for i in range(L)},
                          {f"s{i}": {"a": f32(ga[i]), "b": f32(gb[i])} for i in range(L)})
    for k in range(2):
        for nm in ("a", "b"):
            e = np.asarray(eager[k]["blk/kernel"][nm])
            assert np.all(np.isfinite(e))
            np.testing.assert_allclose(np.asarray(jitted[k]["blk/kernel"][nm]), e, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(np.stack([np.asarray(sliced[k][f"s{i}"][nm]) for i in range(L)]), e,
                                       rtol=1e-4, atol=1e-6)
    # bfloat16 factors and gradients: computed in float32, rounded once to bfloat16
    bf = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), t)  # noqa: E731
    up = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    st16 = opt.init(bf(ad))
    u16, st16 = jax.jit(opt.update)(bf(g), st16, bf(ad))
    u32, _ = opt.update(up(bf(g)), opt.init(up(bf(ad))), up(bf(ad)))
    for nm in ("a", "b"):
        assert u16["blk/kernel"][nm].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(u16["blk/kernel"][nm], np.float32),
                                   np.asarray(u32["blk/kernel"][nm].astype(jnp.bfloat16), np.float32),
                                   rtol=1e-2, atol=1e-6)
    if name.startswith("pro"):
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(st16[0].mu))


@pytest.mark.parametrize("case", ["b_zero", "a_rank_deficient", "both_zero", "b_rank_deficient"])
def test_degenerate_factors_never_nan(case):
    rng = np.random.default_rng(11)
    M, N, r = 6, 5, 3
    A, B = rng.normal(size=(M, r)), rng.normal(size=(r, N))
    if case in ("b_zero", "both_zero"):
        B[:] = 0
    if case == "a_rank_deficient":
        A[:, 1] = 0
        A[:, 2] = A[:, 0]
    if case == "both_zero":
        A[:] = 0
    if case == "b_rank_deficient":
        B[1] = 0
    G = rng.normal(size=(M, N))
    rp = lrjax.LoRA(rank=r, alpha=6.0)
    ad = {"k": {"a": f32(A), "b": f32(B)}}
    g = {"k": {"a": f32(2 * G @ B.T), "b": f32(2 * A.T @ G)}}
    opts = [lora_pro(1e-2, rp, x_mode=m, eps_inv=e) for m in ("sylvester", "symmetry", "zero") for e in (1e-8, 0.0)]
    opts += [lora_pro(1e-2, rp, variant="full"), lora_fa(1e-2, rp, eps_inv=0.0), riemannian_lora(1e-2, rp, reg=0.0)]
    for opt in opts:
        for u in _two_updates(opt, ad, g):
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(u))


def test_training_reduces_loss():
    """Smoke test on a rank-1 shift: every optimizer descends. The efficient variant is slow here
    because Adam's ``v`` remembers the huge first adjusted gradients of ``A`` (``S_B^-1`` with ``B`` ~ 0),
    which is the official rule (checked step by step above)."""
    rng = np.random.default_rng(12)
    M, N, r = 8, 6, 2
    K, Xd = rng.normal(size=(M, N)), rng.normal(size=(32, M))
    Y = Xd @ (K + 0.5 * rng.normal(size=(M, 1)) @ rng.normal(size=(1, N)))
    rp = lrjax.LoRA(rank=r, alpha=2.0)
    A = rng.uniform(-1, 1, size=(M, r)) / np.sqrt(M)
    loss = lambda k: 0.5 * np.mean(np.sum((Xd @ k - Y) ** 2, -1))  # noqa: E731
    for opt, frac in ((lora_pro(3e-2, rp), 0.85), (lora_pro(3e-2, rp, variant="full"), 0.25),
                      (lora_fa(3e-2, rp), 0.85), (riemannian_lora(3e-2, rp), 0.25)):
        a, b = _jax_train(opt, rp, A, np.zeros((r, N)), K, Xd, Y, 40)[-1]
        assert loss(K + rp.scale * a.astype(np.float64) @ b) < frac * loss(K)


# ----------------------------------------------------------------- (7) bad inputs
def test_bad_hyperparameters_named():
    rp = lrjax.LoRA(rank=2)
    with pytest.raises(TypeError, match="rp"):
        scale_by_lora_pro("lora")
    with pytest.raises(TypeError, match="rp"):
        lora_fa(1e-3, {"rank": 2})
    with pytest.raises(TypeError, match="rp"):
        scale_by_riemannian_lora(None)
    with pytest.raises(ValueError, match="rp.*DoRA"):
        lora_pro(1e-3, DoRA(rank=2))
    with pytest.raises(ValueError, match="rp"):
        riemannian_lora(1e-3, DoRA(rank=2))
    for kw, err, name in [({"variant": "fast"}, ValueError, "variant"), ({"variant": 1}, TypeError, "variant"),
                          ({"x_mode": "sym"}, ValueError, "x_mode"), ({"b1": 1.0}, ValueError, "b1"),
                          ({"b1": -0.1}, ValueError, "b1"), ({"b2": 1.5}, ValueError, "b2"),
                          ({"eps": 0.0}, ValueError, "eps"), ({"eps": -1e-8}, ValueError, "eps"),
                          ({"eps_inv": -1.0}, ValueError, "eps_inv"), ({"b1": float("nan")}, ValueError, "b1")]:
        with pytest.raises(err, match=name):
            scale_by_lora_pro(rp, **kw)
    for lr, err in [(-1e-3, ValueError), (float("nan"), ValueError), ("0.1", TypeError), (True, TypeError)]:
        for make in (lora_pro, lora_fa, riemannian_lora):
            with pytest.raises(err, match="learning_rate"):
                make(lr, rp)
    with pytest.raises(ValueError, match="weight_decay"):
        lora_pro(1e-3, rp, weight_decay=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        lora_fa(1e-3, rp, weight_decay=float("inf"))
    with pytest.raises(ValueError, match="reg"):
        scale_by_riemannian_lora(rp, reg=-1.0)
    with pytest.raises(ValueError, match="eps"):
        scale_by_lora_fa(rp, eps=0.0)
    with pytest.raises(ValueError, match="x_mode"):
        lora_pro_adjust(jnp.ones((3, 2)), jnp.ones((2, 4)), jnp.ones((3, 2)), jnp.ones((2, 4)), 1.0, x_mode="x")
    with pytest.raises(ValueError, match="scale"):
        lora_pro_adjust(jnp.ones((3, 2)), jnp.ones((2, 4)), jnp.ones((3, 2)), jnp.ones((2, 4)), 0.0)


def test_bad_trees_named():
    rp = lrjax.LoRA(rank=2)
    ad = {"w": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3))}}
    g = {"w": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}
    for opt in (lora_pro(1e-3, rp), lora_pro(1e-3, rp, variant="full"), lora_fa(1e-3, rp), riemannian_lora(1e-3, rp)):
        with pytest.raises(ValueError, match=r"params.*LoRA-Pro needs the adapters dict \{path: \{'a','b'\}\} from rp.init"):
            opt.init({"Dense_0": {"kernel": jnp.ones((4, 3))}})
        with pytest.raises(TypeError, match="params.*LoRA-Pro needs the adapters dict"):
            opt.init(jnp.ones((4, 3)))
        with pytest.raises(ValueError, match="params"):
            opt.init({})
        with pytest.raises(ValueError, match="params.*'m'"):
            opt.init({"w": {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3)), "m": jnp.ones(3)}})
        with pytest.raises(ValueError, match="params.*do not pair"):
            opt.init({"w": {"a": jnp.ones((4, 2)), "b": jnp.zeros((3, 3))}})
        with pytest.raises(ValueError, match="params.*rank 3.*rank=2"):
            opt.init({"w": {"a": jnp.ones((4, 3)), "b": jnp.zeros((3, 3))}})
        with pytest.raises(TypeError, match="params.*dtype"):
            opt.init({"w": {"a": jnp.ones((4, 2), jnp.int32), "b": jnp.zeros((2, 3))}})
        st = opt.init(ad)
        with pytest.raises(TypeError, match="params"):
            opt.update(g, st)                                 # params are required
        with pytest.raises(ValueError, match="updates.*shape"):
            opt.update({"w": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 4))}}, st,
                       {"w": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}})
        with pytest.raises(ValueError, match="updates"):
            opt.update({"v": g["w"]}, st, ad)
    st = lora_pro(1e-3, rp).init(ad)
    other = {"v": ad["w"]}
    with pytest.raises(ValueError, match="state"):
        lora_pro(1e-3, rp).update({"v": g["w"]}, st, other)
    with pytest.raises(ValueError, match="state"):
        scale_by_lora_pro(rp).update(g, scale_by_lora_pro(rp, variant="full").init(ad), ad)
    with pytest.raises(ValueError, match="state"):
        scale_by_lora_pro(rp, variant="full").update(g, scale_by_lora_pro(rp).init(ad), ad)
    with pytest.raises(TypeError, match="state"):
        scale_by_lora_pro(rp).update(g, optax.EmptyState(), ad)
    assert isinstance(st[0], LoRAProState)


def test_state_memory_as_documented():
    from lrjax.optim import nbytes
    M, N, r = 40, 30, 4
    ad = {"k": {"a": jnp.ones((M, r)), "b": jnp.zeros((r, N), jnp.bfloat16)}}
    rp = lrjax.LoRA(rank=r)
    assert nbytes(lora_pro(1e-3, rp).init(ad)) == 2 * 4 * (M + N) * r + 4        # float32 moments + count
    assert nbytes(lora_pro(1e-3, rp, variant="full").init(ad)) == 2 * 4 * M * N + 4
    assert nbytes(lora_fa(1e-3, rp).init(ad)) == 2 * 4 * r * N + 4
