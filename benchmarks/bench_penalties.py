"""Cost of a regularised SGD step relative to a plain one, measured in the same run.

MLP 784-512-512-10 (batch 128) and a small conv net (3x32x32 inputs, batch 64), random
data, float32, ``torch.set_num_threads(2)``. For every penalty: warm-up, then ``REPEATS``
alternating blocks of ``BLOCK`` plain steps and ``BLOCK`` regularised steps; the table
gives ``median(reg block) / median(plain block)`` and the amortised ratio of total times
(which includes the periodic full decompositions of the tracked modes). Targets:
<= 1.3x for weighted alpha / power-law / Frechet with tracking, <= 1.1x spectral norm.

Run: ``PYTHONPATH=. python benchmarks/bench_penalties.py [--quick] [--threads 2]
[--device cpu|cuda] [--nets mlp,conv|own] [--rows all|fast|spectral|own] [--interleave]``.

Lazy rows (``every=8``: ``Regularizer(..., every=8)``, the penalty on one step in 8 times
8): their blocks hold a multiple of 8 steps (each regularised block exactly one penalty
step), and the amortised column is the number to read (target <= 1.15x).

Measured on the 2-core CPU box (torch 2.13, float32, two full runs; plain MLP step 5-7 ms,
conv step 36-50 ms; the machine is shared, ratios move by ~0.2x between runs): MLP weight
decay 1.4-1.6x and spectral norm 1.6-1.7x through the loss (1.08-1.15x and 1.18-1.20x in
place, ``[grad]``), exact-SVD penalties 23-28x; tracked (default ``tol=1e-3``) Frechet
2.6-2.9x, weighted alpha 4.8-5.2x, power law 6.9-7.9x (in place 2.0-2.3x, 4.3-4.5x,
6.1-6.4x); with ``tol=5e-3`` 2.5-2.6x, 3.4-3.6x, 4.8-5.0x; conv net 1.0-1.4x everywhere.
The MLP targets (<= 1.3x tracked, <= 1.1x spectral norm) are not met. At random init with
momentum SGD the top eigenvector moves by ~6e-3 rad per step against relative gaps of ~3%,
so every step needs a Ritz step; a tracker call costs two thin products per layer that
stream ``W`` from memory (~0.3 ms each here, and they evict the training GEMMs' operands:
those slow down by ~0.6 ms per step), and the regularised step makes ~1100 more op calls
(views included), most of them a few microseconds of dispatch each; a power-law tail at
the 0.9 quantile needs k = 104 columns, where the k x k ``eigh`` and the n x k QR cost as
much as the products.

Fast-mode rows (``--rows fast``, ``--nets mlp,mlp1024``, ``--pretrain 200`` for the "after
200 steps" rows; issue 20), quick, one thread, three runs of the four configurations on the
shared 2-core box (plain steps 6-57 ms within a run, so single rows move by +-0.3x):
Frechet ``mode="fast"`` in place typically 1.3-1.6x (extremes 0.9x and 1.8x; tracked
1.5-2.6x), with ``every=8`` 1.01-1.11x; power law with ``xmin = tau`` (27% of the init
spectrum in the tail): tracked 15-39x (it re-decomposes every call), fast (16 Gram products,
16 probes, autograd) 9-13x, ``degree=8, probes=8`` 4.5-9x, fast ``every=8`` 1.9-3.6x. The
floor row (the 16 Gram products of the estimate alone, forward only) is 3.0-4.8x: no
Chebyshev/Lanczos estimate of degree 32 fits in 1.5x a plain step on this CPU, whatever
the probes. Hill weighted alpha (one quick run, load ~3): MLP exact 25x, fast in place 12.7x,
fast ``every=8`` 2.4x; conv net 1.2x, 2.2x, 1.15x (its small layers make the SVD cheap).

Spectral norm fused (``--rows spectral --interleave``: plain and every row in turn on one
net, so a load change hits all alike). ``SpectralNorm(mode="fused")``: the iteration and
``c*u*v^T`` ride along with each hooked Linear's own forward/backward, beside its GEMMs
(default ``fuse="adjacent"``) or inside them as one extra row (``fuse="gemm"``); the 512 x
10 head is below ``fuse_min`` and gets the same step in ``accumulate_grad``. 2-core box,
load 2-3, three runs at one thread (plain MLP step 6.3 ms, MLP1024 17.6 ms), ``[grad]``
rows: MLP 784-512-512-10 in place 1.14-1.18x, fused adjacent 1.10-1.11x, fused gemm
1.17-1.18x, through the loss 1.54-1.61x (fused adjacent through the loss, which then adds
nothing: 1.15-1.16x); MLP 784-1024-1024-10 1.05-1.08x, 1.05-1.08x, 1.06-1.09x. At two
threads (plain 4.1 ms) 1.22x, 1.15x, 1.23x. Earlier runs under load 4-7 (gemm only): MLP in
place 1.12-1.19x, gemm 1.20-1.26x; MLP1024 1.07-1.11x, 1.08-1.12x. The floor row (one extra
row per Linear, plain ``cat`` / slice, no iteration) alone is 1.07-1.24x (MLP) and
1.01-1.10x (MLP1024): on this CPU the ``N+1``-row GEMMs and copies cost what the
matrix-vector products save (a 512-wide weight stays in cache, the step is dispatch-bound),
so ``"gemm"`` does not beat in place here; on a GPU with wide layers, where the passes over
``W`` and the host sync of the in-place mode cost more, it is the candidate (not measured:
no device was lent).
``SpectralNorm(mode="fused", block=2)`` (a 2-column block, closed-form top Ritz pair,
``n_iter=2`` block steps per step; rows ``block2``, ``block2 n1`` with one step, ``block2
every=8``), three runs, one thread: MLP 1.27-1.30x, 1.19-1.20x, 1.07-1.08x; MLP1024
1.18-1.20x, 1.12-1.13x, 1.07x (block=1 in the same runs 1.09-1.12x / 1.02-1.09x): within
1e-3 of the exact value along the digits trajectory, but not within 1.1x.

Penalties of ``lambda_max`` fused (``--rows rankone --interleave --rounds 30``, quick, one
thread, three runs on the shared 2-core box, load 3.5-4; plain MLP step 6.7-11 ms, MLP1024
26-28 ms): ``FrechetPrior(mode="fused")`` and ``StableRank(mode="fused")`` ride along with
each hooked Linear like the fused spectral norm, on a 2-column block (``R = V^T W^T`` after
the forward GEMM, top Ritz pair in closed form, ``c r v^T + d W`` and ``V <- orth(R W)``
after the backward). ``[grad]`` rows, MLP 784-512-512-10: Frechet fused 1.22-1.24x (fast
1.43-1.45x, tracked 1.72-1.86x), stable rank fused 1.23-1.28x (fast 1.81-2.15x), spectral
norm fused 1.06-1.08x; MLP 784-1024-1024-10: Frechet fused 1.17-1.22x (fast 1.28-1.36x,
tracked 1.57-1.67x), stable rank fused 1.17-1.19x (fast 1.59-1.69x), spectral norm fused
1.07-1.11x. A one-vector version was ~0.05x cheaper on the MLP (Frechet 1.17-1.19x) but
trailed a crossing of the top two singular values (gradient cosine down to -0.06 on a
digits trajectory). The block is kept as ``2 x n`` rows: ``torch.mm(W, V)`` with a
2-column ``V`` took 0.8-5.4 ms here against 0.07-0.25 ms for ``V^T W^T``.
Lazy fused rows (``every=8``: off steps skip the hooks, the due step runs 4 catch-up block
steps, then ``8 c r v^T + 8 d W``; interleaved blocks of one 8-step window; two runs, 1
thread, load 0.7-5): MLP 784-512-512-10 spectral norm fused 1.07-1.09x (gemm 1.08x),
Frechet fused 1.08-1.14x (through the loss 1.16-1.17x), stable rank fused 1.09-1.16x;
MLP 784-1024-1024-10 1.05-1.09x (gemm 1.06x), 1.11-1.14x (1.09-1.13x), 1.10-1.11x.
``StableRank(mode="fused")`` now takes one extra block step at the current weights
(``power_iters=2``): +0.05x per step (1.32x vs 1.26x on the MLP, 1.23x vs 1.18x on MLP1024
in a quiet sequential run), for 4.3e-4 instead of 2.4e-3 relative along the digits run.

Power law (``xmin = tau = 0.5``) and Hill weighted alpha, ``mode="subspace"`` (``--rows
subspace --interleave``, quick, one thread, four runs on the shared 2-core box, load ~1-3:
at initialisation and ``--pretrain 200``, each twice; plain MLP step 6.3-7.0 ms, MLP1024
18-22 ms; ``[grad]`` rows): a warm-started block of ``need + max(16, need // 4)`` columns
(``need`` = the tail plus one, 27-36% of the spectrum at init; Hill: half of it), three
products of ``W`` with it, a block ``eigh`` and QR, the rank-``block`` gradient per call.
MLP 784-512-512-10: power law subspace 4.75-5.13x per step (fast 10.5-11.2x, tracked
20.5-21.4x), ``every=8`` 1.47-1.62x (fast 2.12-2.27x); Hill subspace 9.70-9.98x (fast
10.3-11.1x), ``every=8`` 2.07-2.23x (fast 2.16-2.31x). MLP 784-1024-1024-10: power law
subspace 7.88-9.90x (fast 9.26-13.7x, tracked 30-40x), ``every=8`` 1.78-2.55x (fast
1.99-2.73x); Hill subspace 15.9-22.1x (fast 9.47-13.6x), ``every=8`` 2.73-3.85x (fast
1.94-2.80x): its block holds half the spectrum (641 columns at 1024). The floor row (only
the two products ``W V``, ``W^T (W V)`` at the current tail size) is 1.87-1.96x (MLP) and
2.54-3.61x (MLP1024) per step, i.e. 1.11-1.12x / 1.19-1.33x amortised over ``every=8``:
on this CPU no method that keeps the tail eigenpairs current reaches the issue's 1.5x per
step, nor 1.15x with ``every=8`` on the 1024-wide MLP. Per call at 1024 x 1024 (block
351, one thread, unloaded minimum): three products 32 ms, the gradient update 10, QR 17,
``eigh`` 12, ``Y^T Y`` and the Ritz rotations 13, against 3.1 ms for one 128-row GEMM.
Tried for a cheaper call and not kept (per call, one thread, 784 x 512 block 167 / 1024 x
1024 block 351: the call 12.2 / 66.9 ms; accuracy along the digits Adam trajectory of
``tests/penalties/test_subspace_mode.py``, power law called every step, from step 9, where
the call is within 4.6e-6 relative, cosine 0.999998): the next block's power step from the
call's own ``W V`` (three products, the Ritz step on a block one step behind the weights)
10.0 / 55.5 ms, but 8.8e-5 / 0.99994 (2.3e-2 at step 2); the same with the Ritz step of
``W W^T`` on ``span(W V)`` (half a power step at the current weights, a Cholesky of ``Y^T
Y`` and ``Z^T Z`` instead of the rotations) 11.6 / 64.6 ms, 3.8e-5 / 0.99999 (3.6e-3 at
step 2), and in this bench no faster (power law 5.06x vs 5.11x, 8.14x vs 8.17x; Hill
11.5x vs 10.5x, 17.3x vs 16.0x); the power step on every 2nd / 4th call only (the Ritz
step alone 32.6 ms at 1024) 1.5e-4 / 3.8e-4, cosine down to 0.975 in the first steps;
one Cholesky QR pass for the QR (-6 / -9%) lost orthogonality (0.27) and 10% of the Ritz
values in float32 on a heavy-tailed spectrum (Householder: 3e-6); ``W^T Y`` as ``(Y^T
W)^T``: -2%.

The own-models nets (``--rows own --nets own`` or ``--nets cnn,transformer,lstm,gru,
regression,dropout``, ``--interleave`` only; issue 20's targets on the own-models issue's
nets): the six models of ``tests/test_own_models.py`` with their batch of 128
(``benchmarks/own_models.py``, shared with ``bench_infer.py``), SGD with momentum on
cross-entropy (the transformer: its 2-class label of the token sequence) or MSE (regression
net). Rows each penalty acts on (``Regularizer.layers``): ResCNN ``stem`` (8x1x3x3),
``block.conv`` (8x8x3x3), ``head`` (10x128); transformer ``emb`` (10x16), the
``in_proj_weight[q|k|v]`` slices (16x16), ``out_proj``, ``linear1`` (32x16), ``linear2``
(16x32), ``head`` (2x16); LSTM / GRU ``rnn.weight_ih_l0`` (64x8 / 48x8),
``rnn.weight_hh_l0`` (64x16 / 48x16), ``head`` (10x16); regression ``0`` (16x1), ``2``
(16x16), ``4`` (1x16), Hill weighted alpha only ``2`` (the others have one eigenvalue);
dropout MLP ``0`` (32x64), ``3`` (10x32). Every penalty of the group reaches all of them
(Hill apart), but ``Regularizer.fused`` is empty on all six: no weight reaches the default
``fuse_min = 65536``, so the fused modes take their ``accumulate_grad`` step (as for conv,
recurrent and attention-slice rows). Quick, one thread, ``--rounds 30``, three runs (and
one of ``--rounds 10``) on the shared 2-core box, load 1.2-1.6; plain steps ResCNN 2.9 ms,
transformer 2.3, LSTM 1.3, GRU 2.0, regression 0.52, dropout 0.53; ``[grad]`` rows, per
step (every=8: amortised over the window), ResCNN / transformer / LSTM / GRU / regression /
dropout: spectral norm in place 1.14 / 1.53-1.57 / 1.28-1.33 / 1.19-1.22 / 1.75-1.79 /
1.56-1.64x; spectral norm fused 1.08-1.09 / 1.36-1.38 / 1.15-1.19 / 1.11-1.12 / 1.41-1.46 /
1.32-1.33x, every=8 1.02 / 1.07-1.08 / 1.03-1.06 / 1.03-1.04 / 1.09-1.14 / 1.10-1.13x;
Frechet fused 1.72-1.74 / 2.02-2.05 / 1.60-1.67 / 1.41-1.44 / 2.48-2.55 / 2.08-2.19x,
every=8 1.10-1.11 / 1.22-1.23 / 1.12-1.16 / 1.09-1.11 / 1.32-1.37 / 1.27-1.29x; stable
rank fused 1.63-1.65 / 2.09-2.14 / 1.64-1.71 / 1.43-1.46 / 2.59-2.67 / 2.16-2.22x, every=8
1.09-1.10 / 1.22-1.23 / 1.13-1.16 / 1.09-1.11 / 1.33-1.38 / 1.27-1.29x; power law subspace
1.54-1.55 / 2.49-2.55 / 1.90-2.02 / 1.63-1.67 / 3.19-3.28 / 2.82-2.99x, every=8 1.07-1.08
/ 1.19-1.21 / 1.11-1.15 / 1.08-1.09 / 1.27-1.33 / 1.27-1.29x; Hill weighted alpha subspace
1.61-1.64 / 2.72-2.79 / 2.04-2.17 / 1.72-1.78 / 2.03-2.08 / 3.12-3.24x, every=8 1.08-1.09 /
1.22-1.24 / 1.13-1.17 / 1.10-1.11 / 1.13-1.18 / 1.31-1.34x. Against the targets: spectral
norm fused <= 1.5x per step on all six (every=8 <= 1.15x too); spectral norm in place
<= 1.1x nowhere; Frechet / stable rank fused <= 1.5x per step only on the GRU, the subspace
modes nowhere; every=8 <= 1.15x for all four on the ResCNN and the GRU, at the edge on the
LSTM (1.11-1.17x), missed on the transformer, regression and dropout nets (1.19-1.39x; Hill
on the regression net 1.13-1.18x). These steps are dispatch-bound: the added time is a
fixed cost per selected row, about 0.1 ms (spectral norm fused), 0.3 ms (Frechet / stable
rank fused; 0.7 ms per conv kernel) and 0.4-0.5 ms (subspace) per row per step (one
``accumulate_grad`` on the dropout MLP's two rows, unloaded: in place 0.20 ms, 44 top-level
ops; spectral norm fused 0.11 ms, 26; Frechet fused 0.47 ms, 116; stable rank fused 0.50
ms, 142; power law subspace 0.80 ms, 126; Hill subspace 1.0 ms, 184), so it exceeds the
targets wherever the plain step is under ~0.5 ms per selected row (regression, dropout,
transformer). Hooking those small Linears (``fuse_min=0``) costs more, not less
(transformer / regression / dropout: spectral norm fused 1.45 / 1.65 / 1.48x against 1.35 /
1.36 / 1.29x in the same run; Frechet fused 2.11 / 2.68 / 2.24x against 2.02 / 2.39 /
2.04x): on these nets only fewer op calls per row (batching the small rows of one net
into one block-diagonal or padded batch) can reach the targets.
That batch is now ``Regularizer(batch=True)`` (the default; rows ``... per-row``:
``batch=False``). Same group, three runs of ``--rounds 30`` (session 8; this box was ~3x
slower that day: plain ResCNN 7.3-10.4 ms, transformer 6.3-10.4, LSTM 2.6-4.8, GRU 4.6-9.1,
regression 1.0-1.8, dropout 1.1-2.0), per row -> batched: Frechet fused ResCNN 1.53-1.67 ->
1.68-1.79x (only its head is batched: the kernels keep conv="pool"'s block), transformer
1.81-1.90 -> 1.15-1.19x, LSTM 1.75-1.79 -> 1.38-1.45x, GRU 1.18-1.44 -> 1.02-1.22x,
regression 2.68-2.88 -> 1.94-2.21x, dropout 2.21-2.30 -> 1.77-1.93x; stable rank fused
1.62-1.79 -> 1.61-1.80, 1.75-2.06 -> 1.13-1.23, 1.83-1.90 -> 1.45-1.49, 1.26-1.46 ->
1.10-1.26, 3.00-3.23 -> 2.04-2.18, 2.32-2.47 -> 1.94-2.08x; every=8 batched Frechet
1.12-1.13 / 0.92-1.04 / 1.11-1.13 / 0.96-1.05 / 1.21-1.30 / 1.20-1.23x (per row 1.07-1.13
/ 1.15-1.23 / 1.23-1.25 / 0.98-1.16 / 1.45-1.55 / 1.33-1.36x). The same runs, unchanged
paths: spectral norm in place 1.02-1.12 / 1.34-1.43 / 1.25-1.39 / 1.16-1.36 / 1.71-1.75 /
1.49-1.62x, fused 1.07-1.11 / 1.21-1.30 / 1.22-1.24 / 1.11-1.22 / 1.45-1.53 / 1.31-1.38x
(every=8 <= 1.18x), power law subspace 1.42-1.52 / 2.01-2.25 / 1.99-2.06 / 1.43-1.61 /
3.36-3.76 / 2.78-2.99x, Hill subspace 1.54-1.66 / 2.36-2.44 / 2.21-2.28 / 1.53-1.75 /
2.17-2.20 / 3.11-3.47x. The batched call on the dropout MLP's two rows is ~60 ops (0.7-0.8
ms here against a ~1 ms plain step), so the tiny nets stay above 1.5x.
The spectral norm's one vector batched too (rows ``spectral norm fused per-row`` /
``spectral norm fused``, three more runs): ResCNN 1.08-1.10 / 1.09-1.10x, transformer
1.26-1.29 / 1.09-1.17x, LSTM 1.22 / 1.18-1.20x, GRU 1.08-1.12 / 1.07-1.14x, regression
1.39-1.58 / 1.41-1.56x, dropout 1.33-1.40 / 1.41-1.48x; ``accumulate_grad`` alone per row /
batched: 2 rows 0.20 / 0.30 ms, 3 rows 0.46 / 0.46 ms, 8 rows 1.45 / 0.57 ms, so vectors
batch from 4 rows on (``SpectralNorm._batch_min_rows``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from own_models import own_models, task_loss  # benchmarks/own_models.py
from torch import nn

from bayes_spectral import penalties as P
from bayes_spectral.apps.nets import make_mlp
from bayes_spectral.spectra.stochastic import chebyshev_moments

BLOCK, REPEATS, WARMUP = 10, 5, 60  # --quick: 5, 3, 30
PRETRAIN = 0  # --pretrain: plain steps before the penalty's warm-up
DEVICE = torch.device("cpu")
LAZY = 8  # every= of the lazy rows


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def mlp():
    return make_mlp(784, (512, 512), 10, named=False)  # seeded by bench()


def mlp1024():
    return make_mlp(784, (1024, 1024), 10, named=False)


class _ProductsFloor(P.Penalty):
    """Not a penalty: the ``degree/2`` thin Gram products of the fast power-law mode's
    estimate (``probes`` columns, forward only, no gradient), returning 0. The floor of
    any Krylov / Chebyshev estimator of that degree."""

    label = "products floor"

    def __init__(self, degree=32, probes=16):
        self.degree, self.probes = degree, probes

    def weight_penalty(self, weight, name=None):
        w = weight.detach().reshape(1, weight.shape[0], -1)
        z = torch.ones(1, min(w.shape[1:]), self.probes, dtype=w.dtype, device=w.device)
        chebyshev_moments(w, z, self.degree, torch.tensor(2.0, dtype=w.dtype, device=w.device))
        return weight.new_zeros(())


class _PadFloor(P.Penalty):
    """Not a penalty: the fused spectral norm's extra row alone (every selected Linear's
    input padded with one row, its output stripped, plain ops, no Function, no iteration),
    returning 0: the floor of any one-extra-row fusion on this machine's GEMMs."""

    label = "pad floor"
    mode = "fused"  # bench(): plain blocks run without the hooks

    class _Hooks:
        def __init__(self, modules):
            self.names = [n for n, _ in modules]
            self._h = []
            for _, m in modules:
                self._h += [m.register_forward_pre_hook(self._pre),
                            m.register_forward_hook(self._post)]

        @staticmethod
        def _pre(mod, args):
            if mod.training and torch.is_grad_enabled():
                x = args[0]
                return (torch.cat([x, x[:1]]),)
            return None

        @staticmethod
        def _post(mod, args, out):
            return out[:-1] if mod.training and torch.is_grad_enabled() else None

        def remove(self):
            for h in self._h:
                h.remove()
            self._h, self.names = [], []

    def attach(self, rows):
        return self._Hooks([(n, r.module) for n, r in rows.items()
                            if isinstance(r.module, nn.Linear)])

    def weight_penalty(self, weight, name=None):
        return weight.new_zeros(())

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        return weight.new_zeros(())


class _TailBlockFloor(P.Penalty):
    """Not a penalty: the two ``k``-column products ``A V`` and ``A^T (A V)`` of one subspace
    step (``A`` the weight, oriented small side last), ``k`` the layer's current power-law
    tail (eigenvalues ``>= xmin = 0.5``, counted once per layer by ``eigvalsh``), a fixed
    orthonormal ``V``; returns 0. The floor of any method that keeps the tail eigenpairs
    current (``mode="subspace"`` adds one more product, a ``k x k`` ``eigh``, a ``d x k`` QR
    and the rank-``k`` gradient update)."""

    label = "tail block floor"

    def __init__(self, xmin=0.5):
        self.xmin, self._V = xmin, {}

    def weight_penalty(self, weight, name=None):
        return self.accumulate_grad(weight, None, name)

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        A = weight.detach().reshape(weight.shape[0], -1)
        A = A.mT if A.shape[0] < A.shape[1] else A
        V = self._V.get(name)
        if V is None:
            k = max(1, int((torch.linalg.eigvalsh(A.mT @ A) >= self.xmin).sum()))
            V = self._V[name] = torch.linalg.qr(torch.randn(A.shape[1], k, dtype=A.dtype,
                                                            device=A.device)).Q
        _ = A.mT @ (A @ V)
        return weight.new_zeros(())


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


PENALTIES = {
    "weight decay": lambda: P.WeightDecay(1e-4),
    "spectral norm": lambda: P.SpectralNorm(1e-3),
    # the power iteration and c u v^T beside each Linear's own GEMMs (hooks, fuse="adjacent")
    # or inside them as one extra row (fuse="gemm")
    "spectral norm fused": lambda: P.SpectralNorm(1e-3, mode="fused"),
    "spectral norm fused gemm": lambda: P.SpectralNorm(1e-3, mode="fused", fuse="gemm"),
    # a kept 2-column block, top Ritz pair in closed form (n_iter block steps per step)
    "spectral norm fused block2": lambda: P.SpectralNorm(1e-3, mode="fused", block=2),
    "spectral norm fused block2 n1": lambda: P.SpectralNorm(1e-3, mode="fused", block=2,
                                                            n_iter=1),
    "floor: one extra row per Linear": _PadFloor,
    "nuclear (exact SVD)": lambda: P.NuclearNorm(1e-4),
    "weighted alpha exact": lambda: P.WeightedAlpha(1e-3),
    "weighted alpha tracked": lambda: P.WeightedAlpha(1e-3, tracked=True),
    "power-law exact": lambda: P.PowerLawPrior(3.0, 0.05, xmin_quantile=0.9, coef=1e-4),
    "power-law tracked": lambda: P.PowerLawPrior(3.0, 0.05, xmin_quantile=0.9, coef=1e-4,
                                                 tracked=True),
    "Frechet exact": lambda: P.FrechetPrior(2.0, 1.0, 0.05, coef=1e-4),
    "Frechet tracked": lambda: P.FrechetPrior(2.0, 1.0, 0.05, coef=1e-4, tracked=True),
    # looser drift test: values within ~1e-3 but gradients only ~1e-2 (tracking.py table)
    "weighted alpha tr. 5e-3": lambda: P.WeightedAlpha(1e-3, tracked=True, tol=5e-3),
    "power-law tr. 5e-3": lambda: P.PowerLawPrior(3.0, 0.05, xmin_quantile=0.9, coef=1e-4,
                                                  tracked=True, tol=5e-3),
    "Frechet tr. 5e-3": lambda: P.FrechetPrior(2.0, 1.0, 0.05, coef=1e-4, tracked=True,
                                               tol=5e-3),
    # mode="fast" (issue 20): Frechet by a warm-started 8-column block iteration; the power
    # law with xmin = tau = 0.5 (27% of the init spectrum above xmin) by Hutchinson x Chebyshev
    "Frechet fast": lambda: P.FrechetPrior(2.0, 1.0, 0.05, coef=1e-4, mode="fast"),
    # mode="fused": one power-iteration step per training step in hooks beside each hooked
    # Linear's GEMMs, the rank-1 gradient c(lambda) r v^T plus d W (penalties/fused.py)
    "Frechet fused": lambda: P.FrechetPrior(2.0, 1.0, 0.05, coef=1e-4, mode="fused"),
    "stable rank fast": lambda: P.StableRank(1e-3, mode="fast"),
    "stable rank fused": lambda: P.StableRank(1e-3, mode="fused"),
    "power-law xmin=tau exact": lambda: P.PowerLawPrior(3.0, 0.5, coef=1e-4),
    "power-law xmin=tau tracked": lambda: P.PowerLawPrior(3.0, 0.5, coef=1e-4, tracked=True),
    "power-law xmin=tau fast": lambda: P.PowerLawPrior(3.0, 0.5, coef=1e-4, mode="fast"),
    "power-law fast d8 p8": lambda: P.PowerLawPrior(3.0, 0.5, coef=1e-4, mode="fast",
                                                    degree=8, probes=8),
    "floor: 16 Gram products, 16 probes": lambda: _ProductsFloor(32, 16),
    # Hill weighted alpha (xmin at the median): exact = a full SVD; fast = xmin from an eigh
    # every 50 calls, S by Hutchinson x Chebyshev (16 probes, degree 32), lambda_max by block
    "weighted alpha [hill] exact": lambda: P.WeightedAlpha(1e-3, estimator="hill"),
    "weighted alpha [hill] fast": lambda: P.WeightedAlpha(1e-3, estimator="hill", mode="fast"),
    # mode="subspace": the tail eigenpairs by a warm-started fixed-size block (3 products of
    # W with the block per call, k x k eigh), exact gradient through the Ritz pairs
    "power law subspace": lambda: P.PowerLawPrior(3.0, 0.5, coef=1e-4, mode="subspace"),
    "weighted alpha subspace": lambda: P.WeightedAlpha(1e-3, estimator="hill",
                                                       mode="subspace"),
    "floor: tail block": _TailBlockFloor,
}


def _parse(pen_name: str) -> tuple[str, bool, int, bool]:
    """``(penalty key, in place, every, batch)`` of a row name like ``"X every=8 [grad]"``;
    ``" per-row"`` before the suffixes: ``Regularizer(batch=False)`` (the fused rank-one
    penalties' unhooked rows one at a time instead of the batched pass)."""
    in_place = pen_name.endswith(" [grad]")
    key = pen_name.removesuffix(" [grad]")
    every = 1
    if key.endswith(f" every={LAZY}"):
        key, every = key.removesuffix(f" every={LAZY}"), LAZY
    batch = not key.endswith(" per-row")
    return key.removesuffix(" per-row"), in_place, every, batch


def bench(make_net, x_shape, batch, name, pen_name):
    torch.manual_seed(0)
    net = make_net().to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    xs = torch.randn(8, batch, *x_shape, device=DEVICE)
    ys = torch.randint(0, 10, (8, batch), device=DEVICE)
    key, in_place, every, batch = _parse(pen_name)
    pen = PENALTIES[key]()
    holder = [P.Regularizer(net, pen, log=False, every=every, batch=batch)]
    block = BLOCK if every == 1 else every * max(1, round(BLOCK / every))
    i = [0]

    def hooks(on):
        """Fused rows: the plain blocks run without the hooks (re-attached after, same
        penalty state)."""
        if holder[0].fused and not on:
            holder[0].remove_hooks()
        elif on and getattr(pen, "mode", None) == "fused" and not holder[0].fused:
            holder[0] = P.Regularizer(net, pen, log=False, every=every, batch=batch)

    def step(regularised):
        reg = holder[0]
        k = i[0] % 8
        i[0] += 1
        loss = nn.functional.cross_entropy(net(xs[k]), ys[k])
        if regularised and not in_place:
            loss = reg.loss(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if regularised and in_place:
            reg.accumulate_grad()
        opt.step()

    hooks(False)
    for _ in range(PRETRAIN):  # "after N steps": plain training first
        step(False)
    hooks(True)
    for _ in range(WARMUP):
        step(True)
    holder[0].calls = 0  # every regularised block starts with the penalty step
    plain, regd = [], []
    for _ in range(REPEATS):
        for flag, out in ((False, plain), (True, regd)):
            hooks(flag)
            _sync()
            t0 = time.perf_counter()
            for _ in range(block):
                step(flag)
            _sync()
            out.append(time.perf_counter() - t0)
    med = statistics.median(regd) / statistics.median(plain)
    amort = sum(regd) / sum(plain)
    holder[0].remove_hooks()
    extra = ""
    if getattr(pen, "tracked", False):
        trs = pen._trackers
        extra = "refreshes " + ",".join(str(t.num_refreshes) for t in trs.values())
        extra += " iters/call " + ",".join(
            f"{t.num_iters / max(1, t.num_calls):.1f}" for t in trs.values())
    print(f"| {name:8s} | {pen_name:38s} | {1e3 * statistics.median(plain) / block:7.2f} | "
          f"{med:6.2f}x | {amort:6.2f}x | {extra}", flush=True)


#: "[grad]": the same penalty through Regularizer.accumulate_grad (in-place gradient after
#: loss.backward(), no graph through the penalty)
IN_PLACE = ["weight decay [grad]", "spectral norm [grad]", "spectral norm fused [grad]",
            "weighted alpha tracked [grad]",
            "power-law tracked [grad]", "Frechet tracked [grad]"]
#: lazy rows: the penalty every 8th step, times 8
LAZY_ROWS = [f"{k} every={LAZY}{g}" for k, g in (
    ("spectral norm", " [grad]"), ("nuclear (exact SVD)", ""), ("weighted alpha exact", ""),
    ("Frechet exact", ""), ("weighted alpha tracked", " [grad]"),
    ("power-law tracked", " [grad]"), ("Frechet tracked", " [grad]"))]
#: spectral norm through the loss, in place and fused (``--rows spectral``)
SPECTRAL_ROWS = ["spectral norm", "spectral norm [grad]", "spectral norm fused",
                 "spectral norm fused [grad]", "spectral norm fused gemm [grad]",
                 "floor: one extra row per Linear [grad]",
                 f"spectral norm fused every={LAZY} [grad]",
                 f"spectral norm fused gemm every={LAZY} [grad]",
                 "spectral norm fused block2 [grad]", "spectral norm fused block2 n1 [grad]",
                 f"spectral norm fused block2 every={LAZY} [grad]"]
#: penalties of lambda_max (and ||W||_F^2): tracked / fast / fused (``--rows rankone``)
RANK_ONE_ROWS = ["spectral norm fused [grad]", "Frechet tracked [grad]", "Frechet fast [grad]",
                 "Frechet fused [grad]", "Frechet fused", "stable rank fast [grad]",
                 "stable rank fused [grad]", f"spectral norm fused every={LAZY} [grad]",
                 f"Frechet fused every={LAZY} [grad]", f"Frechet fused every={LAZY}",
                 f"stable rank fused every={LAZY} [grad]"]
#: issue 20's fast-mode rows (``--rows fast``)
FAST_ROWS = ["Frechet tracked [grad]", "Frechet fast", "Frechet fast [grad]",
             f"Frechet fast every={LAZY} [grad]", "power-law xmin=tau tracked [grad]",
             "power-law xmin=tau fast [grad]", f"power-law xmin=tau fast every={LAZY} [grad]",
             "power-law fast d8 p8 [grad]", "floor: 16 Gram products, 16 probes",
             "weighted alpha [hill] exact", "weighted alpha [hill] fast [grad]",
             f"weighted alpha [hill] fast every={LAZY} [grad]"]


#: issue 20's subspace-mode rows (``--rows subspace``), beside the tracked / fast ones
SUBSPACE_ROWS = ["power-law xmin=tau tracked [grad]", "power-law xmin=tau fast [grad]",
                 f"power-law xmin=tau fast every={LAZY} [grad]", "power law subspace [grad]",
                 f"power law subspace every={LAZY} [grad]",
                 "weighted alpha [hill] fast [grad]",
                 f"weighted alpha [hill] fast every={LAZY} [grad]",
                 "weighted alpha subspace [grad]", f"weighted alpha subspace every={LAZY} [grad]",
                 "floor: tail block [grad]"]


#: issue 20's fast modes on the own-models issue's nets (``--rows own --nets own``)
OWN_ROWS = ["spectral norm [grad]", "spectral norm fused per-row [grad]",
            "spectral norm fused [grad]",
            f"spectral norm fused every={LAZY} [grad]", "spectral norm fused block2 [grad]",
            "Frechet fused per-row [grad]", f"Frechet fused per-row every={LAZY} [grad]",
            "Frechet fused [grad]",
            f"Frechet fused every={LAZY} [grad]", "stable rank fused per-row [grad]",
            "stable rank fused [grad]", f"stable rank fused every={LAZY} [grad]",
            "power law subspace [grad]",
            f"power law subspace every={LAZY} [grad]", "weighted alpha subspace [grad]",
            f"weighted alpha subspace every={LAZY} [grad]"]


def _own_net(name: str, label: str):
    """``(make, None, 128, label, data)`` of one ``own_models()`` entry; ``data()`` gives
    ``(x[None], y[None], loss)``: one batch of 128 and the loss of the model's likelihood."""
    def make():
        return own_models()[name][0]()

    def data():
        _, x, y, likelihood = own_models()[name]
        return x[None], y[None], task_loss(likelihood)
    return make, None, 128, label, data


#: ``--nets own``: the six nets of ``tests/test_own_models.py`` (``benchmarks/own_models.py``)
OWN_NETS = {k: _own_net(n, label) for k, n, label in (
    ("cnn", "cnn + BatchNorm, residual", "ResCNN"),
    ("transformer", "embedding + transformer", "Transf."), ("lstm", "lstm", "LSTM"),
    ("gru", "gru", "GRU"), ("regression", "regression mlp, learned noise", "Regress."),
    ("dropout", "mlp + dropout", "Dropout"))}


def bench_interleaved(make_net, x_shape, batch, name, pen_names, rounds=None, data=None):
    """Plain and every row of ``pen_names`` in turn on ONE net, blocks of ``BLOCK // 2``
    steps, ``rounds`` rounds (``4 * REPEATS``): a load change on the shared machine hits
    every row alike (after ``PRETRAIN`` plain steps). Prints ``median(row block) /
    median(plain block)`` per row (per step: a lazy row's block is ``LAZY`` steps, one
    penalty step and ``LAZY - 1`` off steps). ``data``: ``None`` (8 random batches of
    ``x_shape``, 10 classes, cross-entropy) or a callable giving ``(batches, targets,
    loss)`` (the ``OWN_NETS``)."""
    torch.manual_seed(0)
    net = make_net().to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    if data is None:
        xs = torch.randn(8, batch, *x_shape, device=DEVICE)
        ys = torch.randint(0, 10, (8, batch), device=DEVICE)
        task = nn.functional.cross_entropy
    else:
        xs, ys, task = data()
        xs, ys = xs.to(DEVICE), ys.to(DEVICE)
    nb = len(xs)
    for j in range(PRETRAIN):  # "after N steps": plain training first
        opt.zero_grad(set_to_none=True)
        task(net(xs[j % nb]), ys[j % nb]).backward()
        opt.step()
    kinds = {"plain": (None, False, 1, True)}
    for pen_name in pen_names:
        key, in_place, every, batch = _parse(pen_name)
        kinds[pen_name] = (PENALTIES[key](), in_place, every, batch)
    times = {k: [] for k in kinds}
    n = max(2, BLOCK // 2)
    for r in range(1 + (rounds or 4 * REPEATS)):
        for kind, (pen, in_place, every, batch) in kinds.items():
            reg = None if pen is None else P.Regularizer(net, pen, log=False, every=every,
                                                         batch=batch)
            steps = n if every == 1 else every  # a lazy block: one whole window
            _sync()
            t0 = time.perf_counter()
            for j in range(steps):
                loss = task(net(xs[j % nb]), ys[j % nb])
                if reg is not None and not in_place:
                    loss = reg.loss(loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if reg is not None and in_place:
                    reg.accumulate_grad()
                opt.step()
            _sync()
            if r:  # round 0 warms up
                times[kind].append((time.perf_counter() - t0) * n / steps)
            if reg is not None:
                reg.remove_hooks()
    plain = statistics.median(times["plain"])
    for kind in pen_names:
        print(f"| {name:8s} | {kind:38s} | {1e3 * plain / n:7.2f} | "
              f"{statistics.median(times[kind]) / plain:6.2f}x | interleaved", flush=True)


def main(argv=None):
    global BLOCK, REPEATS, WARMUP, DEVICE, PRETRAIN
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="blocks of 5, 3 repeats, warm-up 30")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nets", default="mlp,conv",
                    help="comma-separated: mlp, mlp1024 (784-1024-1024-10), conv; with "
                         "--interleave also cnn, transformer, lstm, gru, regression, "
                         "dropout or own (all six: tests/test_own_models.py)")
    ap.add_argument("--rows", default="all",
                    help="all, fast (issue 20's fast-mode rows), spectral (spectral norm: "
                         "through the loss, in place, fused) or rankone (Frechet and stable "
                         "rank: tracked / fast / fused) or subspace (power law and Hill "
                         "weighted alpha: tracked / fast / subspace) or own (the fast "
                         "modes for the own-models nets)")
    ap.add_argument("--interleave", action="store_true",
                    help="plain and all rows in turn on one net (bench_interleaved)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="--interleave: rounds of plain and every row (default 4 x repeats)")
    ap.add_argument("--pretrain", type=int, default=0,
                    help="plain SGD steps before the warm-up (the 'after 200 steps' rows)")
    args = ap.parse_args(argv)
    PRETRAIN = args.pretrain
    if args.quick:
        BLOCK, REPEATS, WARMUP = 5, 3, 30
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"block {BLOCK} steps ({LAZY * max(1, round(BLOCK / LAZY))} for every={LAZY}), "
          f"{REPEATS} repeats, warm-up {WARMUP} steps, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {DEVICE}, pretrain {PRETRAIN} steps")
    print(f"| net      | {'penalty':38s} | plain ms | median  | amortised | tracking")
    print(f"|----------|{'-' * 40}|---------|---------|-----------|---------")
    rows = {"fast": FAST_ROWS, "spectral": SPECTRAL_ROWS, "rankone": RANK_ONE_ROWS,
            "subspace": SUBSPACE_ROWS, "own": OWN_ROWS}.get(
        args.rows, [*PENALTIES, *IN_PLACE, *LAZY_ROWS, *FAST_ROWS])
    nets = {"mlp": (mlp, (784,), 128, "MLP"), "conv": (convnet, (3, 32, 32), 64, "ConvNet"),
            "mlp1024": (mlp1024, (784,), 128, "MLP1024")}
    nets = {k: (*v, None) for k, v in nets.items()} | OWN_NETS
    names = [n.strip() for n in args.nets.split(",")]
    for net in [m for n in names for m in (OWN_NETS if n == "own" else [n])]:
        make, shape, batch, label, data = nets[net]
        if args.interleave:
            bench_interleaved(make, shape, batch, label, rows, rounds=args.rounds, data=data)
            continue
        if data is not None:
            raise SystemExit(f"--nets {net}: the own-models nets need --interleave")
        for pen_name in rows:
            bench(make, shape, batch, label, pen_name)


if __name__ == "__main__":
    main()
