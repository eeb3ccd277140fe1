"""Bit-identity check for refactors of the attack engine (digits + breast cancer).

Runs PGD (Linf/L2/L1, restarts, margin loss, targeted), APGD, APGD-T, FGSM, Square,
HopSkipJump, CW, DeepFool, the transfer attack's full-step PGD, constrained PGD/search and the
adversarial trainer's pgd_perturb/trades_perturb with fixed seeds and saves every output::

    git checkout OLD && python benchmarks/engine_identity.py before.pt
    git checkout NEW && python benchmarks/engine_identity.py after.pt
    python benchmarks/engine_identity.py --diff before.pt after.pt

(The gradient-engine refactor: 49 of 49 outputs bit-identical.)
(The split of every function over 80 lines into helpers, issue 12: 49 of 49 bit-identical.)
"""

import sys

import numpy as np
import torch
from sklearn.datasets import load_digits

from advguard.attacks.evasion.apgd import APGD
from advguard.attacks.evasion.cw import CarliniWagnerL2
from advguard.attacks.evasion.deepfool import DeepFool
from advguard.attacks.evasion.fgsm import FGSM
from advguard.attacks.evasion.hopskipjump import HopSkipJump
from advguard.attacks.evasion.pgd import PGD
from advguard.attacks.evasion.square import SquareAttack
from advguard.attacks.tabular.constrained_pgd import ConstrainedPGD
from advguard.attacks.tabular.constrained_search import ConstrainedSearch
from advguard.attacks.tabular.schema import FeatureSchema
from advguard.attacks.transfer import TransferAttack
from advguard.data import load_builtin
from advguard.defenses.training import pgd_perturb, trades_perturb
from advguard.models import TorchClassifier
from advguard.models.fit import fit
from advguard.models.zoo import mlp, small_cnn

torch.set_num_threads(1)
if sys.argv[1] == "--diff":
    a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
    bad = [k for k in a if k not in b or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    print(f"{len(a)} outputs compared; {len(a) - len(bad)} bit-identical; differing: {bad}")
    sys.exit(1 if bad else 0)
out_path = sys.argv[1]
d = load_digits()
x = (d.images / 16.0).astype(np.float32)[:, None]
y = d.target.astype(np.int64)
perm = np.random.default_rng(0).permutation(len(x))
x, y = x[perm], y[perm]
torch.manual_seed(0)
net = fit(small_cnn((1, 8, 8), 10), x[:1400], y[:1400], epochs=5, seed=0)
model = TorchClassifier(net, input_shape=(1, 8, 8), num_classes=10)
xe, ye = torch.tensor(x[1400:1500]), torch.tensor(y[1400:1500])
out = {}


for norm, eps in (("linf", 0.1), ("l2", 0.8), ("l1", 4.0)):
    for kw in ({}, {"restarts": 2, "loss": "margin"}):
        r = PGD(norm=norm, steps=10, **kw)(model, xe, ye, epsilon=eps)
        out[f"pgd-{norm}-{kw}"] = r.x_adv
        out[f"pgd-{norm}-{kw}-evals"] = torch.tensor([r.forward_evals, r.gradient_evals])
    t = (ye + 1) % 10
    out[f"pgd-{norm}-targeted"] = PGD(norm=norm, steps=10)(
        model, xe, ye, epsilon=eps, targets=t
    ).x_adv
for norm, eps in (("linf", 0.1), ("l2", 0.8)):
    out[f"apgd-{norm}"] = APGD(norm=norm, steps=10)(model, xe, ye, epsilon=eps).x_adv
    out[f"apgdt-{norm}"] = (
        APGD(norm=norm, steps=10, loss="dlr", n_target_classes=3)
        .targeted_sweep(model, xe, ye, epsilon=eps)
        .x_adv
    )
    out[f"fgsm-{norm}"] = FGSM(norm=norm)(model, xe, ye, epsilon=eps).x_adv
    out[f"square-{norm}"] = SquareAttack(norm=norm, max_queries=50)(
        model, xe[:20], ye[:20], epsilon=eps
    ).x_adv
    out[f"square-q-{norm}"] = SquareAttack(norm=norm, max_queries=50)(
        model, xe[:20], ye[:20], epsilon=eps
    ).queries
    r = HopSkipJump(norm=norm if norm == "l2" else "linf", max_queries=300, max_iter=5)(
        model, xe[:10], ye[:10]
    )
    out[f"hsj-{norm}"], out[f"hsj-q-{norm}"] = r.x_adv, r.queries
out["cw"] = CarliniWagnerL2(steps=20, binary_search_steps=3)(model, xe[:20], ye[:20]).x_adv
out["deepfool"] = DeepFool(steps=10)(model, xe[:20], ye[:20]).x_adv

# transfer: full-step PGD on a given surrogate

torch.manual_seed(1)
net2 = fit(small_cnn((1, 8, 8), 10), x[:700], y[:700], epochs=3, seed=1)
sur = TorchClassifier(net2, input_shape=(1, 8, 8), num_classes=10)
for norm, eps in (("linf", 0.2), ("l2", 1.0)):
    r = TransferAttack(surrogates=[sur], norm=norm, base_params={"steps": 10, "restarts": 2})(
        model, xe, ye, epsilon=eps
    )
    out[f"transfer-{norm}"] = r.x_adv
    out[f"transfer-q-{norm}"] = r.queries
    out[f"transfer-evals-{norm}"] = torch.tensor([r.forward_evals, r.gradient_evals])

# trainer perturbations

tn = net  # the trainer attacks a bare module the same way
for norm, eps in (("linf", 0.1), ("l2", 0.8)):
    g = torch.Generator().manual_seed(3)
    out[f"train-pgd-{norm}"] = pgd_perturb(
        tn,
        xe,
        ye,
        epsilon=eps,
        norm=norm,
        steps=7,
        step_size=2.5 * eps / 7,
        bounds=(0.0, 1.0),
        generator=g,
    )
    out[f"train-pgd-nors-{norm}"] = pgd_perturb(
        tn,
        xe,
        ye,
        epsilon=eps,
        norm=norm,
        steps=7,
        step_size=2.5 * eps / 7,
        bounds=(0.0, 1.0),
        generator=g,
        random_start=False,
    )
    out[f"train-trades-{norm}"] = trades_perturb(
        tn,
        xe,
        epsilon=eps,
        norm=norm,
        steps=7,
        step_size=2.5 * eps / 7,
        bounds=(0.0, 1.0),
        generator=g,
    )

# constrained PGD on breast cancer

ds = load_builtin("breast_cancer")
train, test = ds.split(0.25, seed=0)
schema = FeatureSchema.from_dataset(
    ds,
    immutable=["mean radius", "mean perimeter", "mean area", "worst radius", "worst area"],
    monotone_increasing=["worst concave points"],
)
torch.manual_seed(0)
m2 = fit(mlp((30,), 2, hidden=(32,)), train.x, train.y, epochs=40, lr=3e-3, seed=0)
bm = TorchClassifier(m2, input_shape=(30,), num_classes=2)
xt, yt = torch.tensor(test.x[:60]), torch.tensor(test.y[:60])
sc = float(xt.max() - xt.min())
for norm, eps in (("linf", 0.05 * sc), ("l2", 0.2 * sc)):
    for kw in ({}, {"restarts": 2, "loss": "margin"}):
        out[f"cpgd-{norm}-{kw}"] = ConstrainedPGD(schema, norm=norm, steps=10, **kw)(
            bm, xt, yt, epsilon=eps
        ).x_adv
r = ConstrainedSearch(schema, max_queries=40)(bm, xt[:20], yt[:20], epsilon=0.05 * sc)
out["csearch"], out["csearch-q"] = r.x_adv, r.queries
torch.save({k: v.detach().cpu() for k, v in out.items()}, out_path)
print(len(out), "outputs saved")
